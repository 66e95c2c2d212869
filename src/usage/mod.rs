//! Usage: every authenticated call is recorded in `api_request_logs` (partitioned by
//! month) through a batching writer, and usage summaries, breakdowns and listings are SQL
//! aggregates over it.
//!
//! A library feature: the auth/usage layer builds a [`RequestRecord`] per call and hands it
//! to [`RequestLog::record`]; the [`RequestLogWriter`] task (the [`crate::db::batch`]
//! writer) writes batches; [`store`]
//! answers the queries (over a connection the caller passes); the worker runs [`log::maintain_partitions`].
//!
//! Errors are [`StoreError`](crate::db::StoreError): nothing here fails in another way,
//! except the `usage.quota.*` [`notices`], which also emit events.

use std::time::Duration;

pub mod grpc;
pub mod log;
pub mod model;
pub mod notices;
pub mod service;
pub mod store;

pub use log::{RequestLog, RequestLogWriter, WriterStats};
pub use model::{
    BreakdownRow, GroupBy, LogFilter, RequestRecord, StatusClasses, UsageSummary, http_status_for,
};

/// The `DEVGATE_USAGE_*` section, composed by `crate::config`.
#[derive(Debug, Clone)]
pub struct UsageConfig {
    pub retention: Duration,
    pub flush_interval: Duration,
    pub batch_size: usize,
    pub buffer: usize,
}
