//! The delivery pipeline (worker role): [`fanout`] turns each event on `<prefix>.events`
//! into one `webhook_deliveries` row per subscribed endpoint and queues a [`queue::Task`];
//! [`worker`] POSTs it, signed, and records the attempt ([`attempt_log`]); a failed attempt is
//! re-queued through a RabbitMQ delay queue ([`queue`]) until the retry schedule runs out.
//!
//! Every step is at least once and every consumer idempotent: the delivery row is unique per
//! (event, endpoint), a task carries the number of the attempt it is for and a worker claims
//! the row (a lease) before it POSTs, so a duplicate task is dropped or waits, and a crash
//! repeats at most the attempt in flight — with the same `webhook-id`.

pub mod attempt_log;
pub mod fanout;
pub mod queue;
pub mod store;
pub mod worker;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::identity::TenantId;

/// Where a delivery stands (the `status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// An attempt is queued or scheduled.
    Pending,
    Succeeded,
    /// Retries exhausted, `410 Gone`, or the endpoint was disabled.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "succeeded" => Some(DeliveryStatus::Succeeded),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// A `webhook_deliveries` row.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub id: Uuid,
    pub tenant: TenantId,
    pub endpoint_id: Uuid,
    pub event_id: Uuid,
    pub event_type: String,
    pub status: DeliveryStatus,
    pub attempts: i32,
    pub next_attempt_time: Option<DateTime<Utc>>,
    pub last_attempt_time: Option<DateTime<Utc>>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
}

/// Why an attempt failed (the `error_kind` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Timeout,
    Connect,
    Tls,
    Dns,
    RefusedBySsrfGuard,
    /// The endpoint answered, but not 2xx.
    Status,
    Other,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Tls => "tls",
            ErrorKind::Dns => "dns",
            ErrorKind::RefusedBySsrfGuard => "refused_by_ssrf_guard",
            ErrorKind::Status => "status",
            ErrorKind::Other => "other",
        }
    }
}

/// One HTTP attempt, as the attempt log stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub delivery_id: Uuid,
    pub attempt: i32,
    pub tenant: TenantId,
    pub endpoint_id: Uuid,
    pub attempt_time: DateTime<Utc>,
    pub url: String,
    pub status_code: Option<i32>,
    /// Lower-case names; cut with the body to [`MAX_RESPONSE_BYTES`].
    pub response_headers: Vec<(String, String)>,
    pub response_body: String,
    pub latency_ms: i32,
    pub error_kind: Option<ErrorKind>,
    pub error_message: Option<String>,
    /// A manual retry or recover rather than the schedule.
    pub manual: bool,
}

/// How much of a response (body, and headers together) is read and kept.
pub const MAX_RESPONSE_BYTES: usize = 20 * 1024;
