//! The request log's write path: the auth/usage layer drops one [`RequestRecord`] per call
//! into a bounded channel ([`RequestLog::record`], which never waits) and one task
//! ([`RequestLogWriter::run`]) writes them as multi-row INSERTs of up to `batch_size` rows
//! (STACK-NOTES: ≈ 240k rows/s batched against ≈ 12k rows/s one per transaction).
//!
//! Losing a record is preferred to slowing a request down or growing without bound, and
//! every loss is counted in [`RequestLog::dropped`]:
//! - the channel is full (the writer cannot keep up, or Postgres is down long enough);
//! - Postgres is down and more than `10 × batch_size` rows wait in the writer: the oldest go;
//! - Postgres is still down when the shutdown retries run out.
//!
//! Also the monthly partitions' upkeep ([`maintain_partitions`]), which the worker runs
//! periodically, and [`rows_in_default_partition`] (non-zero means a bug: see the migration).

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use diesel::{
    QueryableByName,
    pg::data_types::PgInterval,
    sql_types::{BigInt, Int4, Interval},
};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{model::RequestRecord, store};
use crate::db::{self, PgPool, StoreError};

/// Default channel capacity of [`RequestLog::new`].
pub const DEFAULT_CAPACITY: usize = 65_536;
/// Default rows per INSERT.
pub const DEFAULT_BATCH_SIZE: usize = 500;
/// Default longest wait before buffered rows are written.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Postgres accepts at most 65 535 bind parameters per statement; a row binds 17.
pub const MAX_BATCH_SIZE: usize = 65_535 / store::COLUMNS;
/// While writes fail, at most this many batches wait in the writer (the oldest rows go).
const MAX_BUFFERED_BATCHES: usize = 10;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// On shutdown, how long failed final writes are retried before the rows are given up.
const SHUTDOWN_RETRY_FOR: Duration = Duration::from_secs(5);
/// At most one warning about a full channel per this period.
const CHANNEL_WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Counters {
    /// Records refused by a full (or closed) channel.
    channel_dropped: AtomicU64,
    /// Records the writer gave up (outage overflow, shutdown with Postgres down).
    writer_dropped: AtomicU64,
    batches: AtomicU64,
    rows: AtomicU64,
}

/// The cheap-to-clone recording handle.
#[derive(Clone)]
pub struct RequestLog {
    tx: mpsc::Sender<RequestRecord>,
    counters: Arc<Counters>,
}

impl RequestLog {
    /// A handle with the default capacity ([`DEFAULT_CAPACITY`]) and its writer, which the
    /// caller spawns with [`RequestLogWriter::run`].
    pub fn new() -> (Self, RequestLogWriter) {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// Like [`RequestLog::new`] with room for `capacity` (at least 1) records in flight.
    pub fn with_capacity(capacity: usize) -> (Self, RequestLogWriter) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let counters = Arc::new(Counters::default());
        (
            RequestLog {
                tx,
                counters: counters.clone(),
            },
            RequestLogWriter { rx, counters },
        )
    }

    /// Queues `r` for writing. Never waits: when the channel is full (or the writer has
    /// stopped) the record is counted in [`RequestLog::dropped`] and discarded.
    pub fn record(&self, r: RequestRecord) {
        if self.tx.try_send(r).is_err() {
            self.counters
                .channel_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records lost so far, for every reason (full channel, outage overflow, shutdown).
    pub fn dropped(&self) -> u64 {
        self.counters.channel_dropped.load(Ordering::Relaxed)
            + self.counters.writer_dropped.load(Ordering::Relaxed)
    }

    /// INSERT statements that succeeded so far.
    pub fn batches_written(&self) -> u64 {
        self.counters.batches.load(Ordering::Relaxed)
    }

    /// Rows written so far.
    pub fn rows_written(&self) -> u64 {
        self.counters.rows.load(Ordering::Relaxed)
    }

    /// Records waiting in the channel (not those already taken by the writer).
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// What a writer did over its whole run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// INSERT statements that succeeded.
    pub batches_written: u64,
    pub rows_written: u64,
    /// Rows the writer gave up (not counting those refused by a full channel).
    pub rows_dropped: u64,
}

/// The receiving end: run it once, as a task of its own.
pub struct RequestLogWriter {
    rx: mpsc::Receiver<RequestRecord>,
    counters: Arc<Counters>,
}

impl RequestLogWriter {
    /// Writes records until `shutdown`, then drains the channel, writes everything and
    /// returns. A batch is written once `batch_size` rows are buffered (clamped to
    /// 1..=[`MAX_BATCH_SIZE`]) or every `flush_interval`, whichever comes first. When a
    /// write fails the rows stay buffered and are retried with exponential backoff
    /// (100 ms to 30 s); past `10 × batch_size` buffered rows the oldest are dropped. At
    /// shutdown failed writes are retried for up to 5 s. Also returns when every
    /// [`RequestLog`] handle is gone.
    pub async fn run(
        mut self,
        pool: PgPool,
        flush_interval: Duration,
        batch_size: usize,
        shutdown: CancellationToken,
    ) -> WriterStats {
        let batch_size = batch_size.clamp(1, MAX_BATCH_SIZE);
        let mut w = Buffer {
            pool,
            rows: VecDeque::with_capacity(batch_size),
            batch_size,
            max_buffered: batch_size * MAX_BUFFERED_BATCHES,
            counters: self.counters.clone(),
            outage: None,
            stats: WriterStats::default(),
        };
        let mut tick = tokio::time::interval(flush_interval.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut incoming = Vec::with_capacity(batch_size);
        let mut channel_warned = ChannelDropWarnings::default();
        loop {
            let retry_at = w.outage.as_ref().map(|o| o.retry_at);
            tokio::select! {
                // Timers before the channel: under sustained traffic `recv_many` is always
                // ready, and the retry must still run during an outage.
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)),
                    if retry_at.is_some() => w.flush(true).await,
                _ = tick.tick() => {
                    if w.outage.is_none() {
                        w.flush(true).await;
                    }
                    channel_warned.check(&self.counters);
                }
                n = self.rx.recv_many(&mut incoming, batch_size) => {
                    if n == 0 {
                        break; // every handle is gone
                    }
                    w.push(incoming.drain(..));
                    if w.outage.is_none() && w.rows.len() >= batch_size {
                        w.flush(false).await;
                    }
                }
            }
        }

        // Shutdown: refuse new records (they count as dropped), take what is queued, write.
        self.rx.close();
        while self.rx.recv_many(&mut incoming, batch_size).await > 0 {
            w.push(incoming.drain(..));
            // Write as it drains: a full channel is far more than the outage buffer holds.
            if w.outage.is_none() && w.rows.len() >= batch_size {
                w.flush(false).await;
            }
        }
        channel_warned.check(&self.counters);
        let deadline = Instant::now() + SHUTDOWN_RETRY_FOR;
        loop {
            w.flush(true).await;
            if w.rows.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let lost = w.rows.len() as u64;
                w.rows.clear();
                w.count_dropped(lost);
                tracing::error!(
                    lost,
                    "request log: Postgres still unavailable at shutdown; buffered records lost"
                );
                break;
            }
            let wait = w.outage.as_ref().map_or(BACKOFF_MIN, |o| o.delay);
            tokio::time::sleep(wait.min(deadline - now)).await;
        }
        w.stats
    }
}

/// Warns about records refused by a full channel, at most once per [`CHANNEL_WARN_EVERY`].
#[derive(Default)]
struct ChannelDropWarnings {
    reported: u64,
    last: Option<Instant>,
}

impl ChannelDropWarnings {
    fn check(&mut self, counters: &Counters) {
        let total = counters.channel_dropped.load(Ordering::Relaxed);
        if total == self.reported || self.last.is_some_and(|t| t.elapsed() < CHANNEL_WARN_EVERY) {
            return;
        }
        tracing::warn!(
            dropped = total - self.reported,
            dropped_total = total,
            "request log channel was full; records were dropped"
        );
        self.reported = total;
        self.last = Some(Instant::now());
    }
}

struct Outage {
    delay: Duration,
    retry_at: Instant,
    /// Rows dropped for overflow during this outage.
    dropped: u64,
}

/// The writer's rows not yet written, and what it knows about Postgres.
struct Buffer {
    pool: PgPool,
    rows: VecDeque<RequestRecord>,
    batch_size: usize,
    max_buffered: usize,
    counters: Arc<Counters>,
    outage: Option<Outage>,
    stats: WriterStats,
}

impl Buffer {
    fn push(&mut self, records: impl Iterator<Item = RequestRecord>) {
        for mut r in records {
            sanitize(&mut r);
            self.rows.push_back(r);
        }
        let excess = self.rows.len().saturating_sub(self.max_buffered);
        if excess > 0 {
            self.rows.drain(..excess);
            self.count_dropped(excess as u64);
            if let Some(outage) = &mut self.outage {
                if outage.dropped == 0 {
                    tracing::warn!(
                        buffered = self.rows.len(),
                        "request log: Postgres unavailable and the buffer is full; dropping \
                         the oldest records until writes succeed"
                    );
                }
                outage.dropped += excess as u64;
            }
        }
    }

    fn count_dropped(&mut self, n: u64) {
        self.stats.rows_dropped += n;
        self.counters.writer_dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Writes full batches, and with `all` the remainder too; stops at the first failure.
    async fn flush(&mut self, all: bool) {
        while self.rows.len() >= self.batch_size || (all && !self.rows.is_empty()) {
            let n = self.rows.len().min(self.batch_size);
            let written = async {
                let mut conn = db::connect(&self.pool).await?;
                store::insert_rows(&mut conn, self.rows.range(..n)).await
            };
            match written.await as Result<usize, StoreError> {
                Ok(_) => {
                    self.rows.drain(..n);
                    self.stats.batches_written += 1;
                    self.stats.rows_written += n as u64;
                    self.counters.batches.fetch_add(1, Ordering::Relaxed);
                    self.counters.rows.fetch_add(n as u64, Ordering::Relaxed);
                    if let Some(outage) = self.outage.take() {
                        tracing::info!(
                            dropped = outage.dropped,
                            "request log writes succeed again"
                        );
                    }
                }
                Err(e) => {
                    let delay = match &self.outage {
                        None => {
                            tracing::warn!(
                                error = %e,
                                buffered = self.rows.len(),
                                "request log: writing a batch failed; keeping the rows and \
                                 retrying with backoff"
                            );
                            BACKOFF_MIN
                        }
                        Some(o) => {
                            tracing::debug!(error = %e, "request log: write retry failed");
                            (o.delay * 2).min(BACKOFF_MAX)
                        }
                    };
                    let dropped = self.outage.as_ref().map_or(0, |o| o.dropped);
                    self.outage = Some(Outage {
                        delay,
                        retry_at: Instant::now() + delay,
                        dropped,
                    });
                    return;
                }
            }
        }
    }
}

/// Postgres text cannot hold NUL; one such value would fail its whole batch forever.
fn sanitize(r: &mut RequestRecord) {
    fn fix(s: &mut String) {
        if s.contains('\0') {
            *s = s.replace('\0', "\u{FFFD}");
        }
    }
    fix(&mut r.rpc);
    for s in [
        &mut r.api_key_id,
        &mut r.user_id,
        &mut r.http_method,
        &mut r.http_path,
        &mut r.error_code,
        &mut r.user_agent,
    ]
    .into_iter()
    .flatten()
    {
        fix(s);
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
    // Imported here only: its `load` would shadow `AtomicU64::load` in the rest of the file.
    use diesel_async::RunQueryDsl;
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
    use diesel_async::RunQueryDsl;
    let mut conn = pool.get().await?;
    let row: Count = diesel::sql_query("SELECT count(*) AS n FROM api_request_logs_default")
        .get_result(&mut conn)
        .await?;
    Ok(row.n)
}
