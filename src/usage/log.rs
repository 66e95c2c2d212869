//! The request log's write path: the auth/usage layer drops one [`RequestRecord`] per call
//! into [`RequestLog::record`] (never waits) and one [`RequestLogWriter`] task writes them
//! in multi-row INSERTs: the generic [`crate::db::batch`] writer over [`RequestRecord`]
//! rows, whose loss rules (full channel, outage overflow, shutdown with Postgres down)
//! apply here unchanged.
//!
//! Also the monthly partitions' upkeep ([`maintain_partitions`]), which the worker runs
//! periodically, and [`rows_in_default_partition`] (non-zero means a bug: see the migration).

use std::{future::Future, time::Duration};

use diesel::{
    QueryableByName,
    pg::data_types::PgInterval,
    sql_types::{BigInt, Int4, Interval},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::{model::RequestRecord, store};
use crate::db::{
    PgPool, StoreError,
    batch::{BatchLog, BatchRow, BatchWriter},
};

pub use crate::db::batch::{
    DEFAULT_BATCH_SIZE, DEFAULT_CAPACITY, DEFAULT_FLUSH_INTERVAL, WriterStats,
};

/// The cheap-to-clone recording handle (`RequestLog::new()` / `with_capacity(n)`).
pub type RequestLog = BatchLog<RequestRecord>;
/// The receiving end: run it once, as a task of its own.
pub type RequestLogWriter = BatchWriter<RequestRecord>;

/// Rows per INSERT at most. The insert binds one array per column, so no bind-parameter
/// limit applies; this bounds one statement's size (and the outage buffer, 10 batches).
pub const MAX_BATCH_SIZE: usize = 10_000;

impl BatchRow for RequestRecord {
    const NAME: &'static str = "request log";
    const MAX_BATCH: usize = MAX_BATCH_SIZE;

    /// Postgres text cannot hold NUL; one such value would fail its whole batch forever.
    fn sanitize(&mut self) {
        fn fix(s: &mut String) {
            if s.contains('\0') {
                *s = s.replace('\0', "\u{FFFD}");
            }
        }
        fix(&mut self.rpc);
        for s in [
            &mut self.api_key_id,
            &mut self.user_id,
            &mut self.http_method,
            &mut self.http_path,
            &mut self.error_code,
            &mut self.user_agent,
            &mut self.service_caller,
        ]
        .into_iter()
        .flatten()
        {
            fix(s);
        }
    }

    fn insert<'a>(
        conn: &'a mut AsyncPgConnection,
        rows: Vec<&'a Self>,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send + 'a {
        store::insert_rows(conn, rows.into_iter())
    }
}

/// Creates the monthly partitions from the month containing `now - retain` to
/// `months_ahead` months after the current one, drops those entirely older than
/// `now - retain`, and moves rows stuck in the default partition into the new monthly
/// partitions. Warns when rows remain in the default partition. Safe to run from every
/// replica at once (the SQL function takes an advisory lock).
pub async fn maintain_partitions(
    pool: &PgPool,
    months_ahead: i32,
    retain: Duration,
) -> Result<(), StoreError> {
    let retain =
        PgInterval::from_microseconds(i64::try_from(retain.as_micros()).unwrap_or(i64::MAX));
    {
        let mut conn = pool.get().await?;
        diesel::sql_query("SELECT devgate_request_log_partitions($1, $2)")
            .bind::<Int4, _>(months_ahead)
            .bind::<Interval, _>(retain)
            .execute(&mut conn)
            .await?;
    }
    let stray = rows_in_default_partition(pool).await?;
    if stray > 0 {
        tracing::warn!(
            rows = stray,
            "api_request_logs_default holds rows outside every monthly partition (clock far \
             off, or partition maintenance not running)"
        );
    }
    Ok(())
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Rows in `api_request_logs_default`; anything but 0 is a bug worth a warning.
pub async fn rows_in_default_partition(pool: &PgPool) -> Result<i64, StoreError> {
    let mut conn = pool.get().await?;
    let row: Count = diesel::sql_query("SELECT count(*) AS n FROM api_request_logs_default")
        .get_result(&mut conn)
        .await?;
    Ok(row.n)
}
