//! `db::group::GroupCommit` against a real Postgres: concurrent writes share statements and
//! commits, every caller gets its own answer only once its row is committed, a bad write
//! fails only its own caller, and a lost database fails the batch without hanging.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use devgate::db::{
    StoreError,
    group::{GroupCommit, GroupWrite},
};
use diesel::{QueryableByName, sql_types::BigInt};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::harness::*;

/// Statements run by [`Note::write`], to see the grouping (one per batch).
static STATEMENTS: AtomicUsize = AtomicUsize::new(0);

/// A row of `notes`; a negative value breaks the table's CHECK.
struct Note(i64);

impl GroupWrite for Note {
    type Output = i64;
    const NAME: &'static str = "the test notes";
    const MAX_BATCH: usize = 100;

    async fn write(conn: &mut AsyncPgConnection, writes: &[Self]) -> Result<Vec<i64>, StoreError> {
        #[derive(QueryableByName)]
        struct Id {
            #[diesel(sql_type = BigInt)]
            id: i64,
        }
        STATEMENTS.fetch_add(1, Ordering::Relaxed);
        let values: Vec<i64> = writes.iter().map(|n| n.0).collect();
        let ids: Vec<Id> = diesel::sql_query(
            "INSERT INTO notes (value) SELECT v FROM unnest($1::int8[]) WITH ORDINALITY AS u(v, i) \
             ORDER BY i RETURNING id",
        )
        .bind::<diesel::sql_types::Array<BigInt>, _>(values)
        .load(conn)
        .await?;
        Ok(ids.into_iter().map(|r| r.id).collect())
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(conn: &mut AsyncPgConnection) -> i64 {
    diesel::sql_query("SELECT count(*) AS n FROM notes")
        .get_result::<Count>(conn)
        .await
        .unwrap()
        .n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_groups_writes_and_a_bad_one_fails_alone() {
    let db = TestDb::create().await;
    let config = devgate::Config::from_lookup(|k| match k {
        "DEVGATE_DATABASE_URL" => Some(db.url().to_string()),
        "DEVGATE_DATABASE_CONNECT_TIMEOUT" => Some("2s".into()),
        _ => None,
    })
    .unwrap();
    let pool = devgate::db::pool(&config.database);
    {
        let mut conn = pool.get().await.unwrap();
        diesel::sql_query(
            "CREATE TABLE notes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                                 value bigint NOT NULL CHECK (value >= 0))",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    // One writer: while it runs a batch, everything submitted meanwhile waits for the next.
    let notes = GroupCommit::<Note>::spawn(pool.clone(), 1);
    let before = AtomicUsize::load(&STATEMENTS, Ordering::Relaxed);
    let answers = futures_util::future::join_all((0..300i64).map(|i| {
        let notes = notes.clone();
        async move { notes.submit(Note(i)).await.expect("a good write") }
    }))
    .await;
    let statements = AtomicUsize::load(&STATEMENTS, Ordering::Relaxed) - before;
    // Each caller its own row, all committed, in a few statements (≤ 100 rows each).
    let mut ids = answers.clone();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 300);
    assert!(statements <= 10, "{statements} statements for 300 writes");
    let mut conn = pool.get().await.unwrap();
    assert_eq!(count(&mut conn).await, 300);

    // Two writes that break the CHECK among 100: those two fail, the 98 others commit.
    let answers = futures_util::future::join_all((0..100i64).map(|i| {
        let notes = notes.clone();
        let value = if i == 13 || i == 71 { -1 } else { i };
        async move { (i, notes.submit(Note(value)).await) }
    }))
    .await;
    for (i, answer) in &answers {
        match answer {
            Ok(_) => assert!(
                *i != 13 && *i != 71,
                "write {i} broke the CHECK and succeeded"
            ),
            Err(StoreError::Query(e)) => {
                assert!(*i == 13 || *i == 71, "write {i} failed: {e}");
                assert!(e.to_string().contains("notes_value_check"), "{e}");
            }
            Err(e) => panic!("write {i}: {e}"),
        }
    }
    assert_eq!(count(&mut conn).await, 398);

    // A lone write goes out at once.
    let started = std::time::Instant::now();
    notes.submit(Note(1)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));

    // The database gone: the batch fails as unavailable (no retry one by one, no hang).
    drop(conn);
    let gone = GroupCommit::<Note>::spawn(
        devgate::db::pool(
            &devgate::Config::from_lookup(|k| match k {
                "DEVGATE_DATABASE_URL" => Some("postgres://postgres@127.0.0.1:1/nowhere".into()),
                "DEVGATE_DATABASE_CONNECT_TIMEOUT" => Some("500ms".into()),
                _ => None,
            })
            .unwrap()
            .database,
        ),
        1,
    );
    let started = std::time::Instant::now();
    let failed = futures_util::future::join_all((0..20).map(|i| {
        let gone = gone.clone();
        async move { gone.submit(Note(i)).await }
    }))
    .await;
    assert!(
        failed
            .iter()
            .all(|r| matches!(r, Err(StoreError::Unavailable(_)))),
        "{:?}",
        failed
            .iter()
            .map(|r| r.as_ref().err().map(ToString::to_string))
            .collect::<Vec<_>>()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
