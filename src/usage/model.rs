//! Domain types of the request log and of the usage queries over it.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::identity::TenantId;

/// One authenticated call, as stored in `api_request_logs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// UUIDv7 (time-ordered), chosen here.
    pub id: Uuid,
    pub time: DateTime<Utc>,
    pub tenant_id: TenantId,
    /// None for user (JWT) calls.
    pub api_key_id: Option<String>,
    pub user_id: Option<String>,
    /// The gRPC path, e.g. `/devgate.v1.ApiKeyService/ListApiKeys`.
    pub rpc: String,
    /// `x-envoy-original-method`; None unless the call came through Envoy's transcoder.
    pub http_method: Option<String>,
    /// `x-envoy-original-path`; None unless the call came through Envoy's transcoder.
    pub http_path: Option<String>,
    pub grpc_code: i16,
    /// The HTTP status Envoy maps `grpc_code` to ([`http_status_for`]).
    pub http_status: i16,
    /// The google.rpc.ErrorInfo reason, when the error carried one.
    pub error_code: Option<String>,
    pub latency_us: i32,
    pub request_bytes: i32,
    pub response_bytes: i32,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub cost: i64,
    /// The internal caller that made the call or gated it (a consuming VerifyApiKey).
    pub service_caller: Option<String>,
}

impl RequestRecord {
    /// A record of a call that ended with `grpc_code`, stamped now with a fresh UUIDv7 and
    /// the matching `http_status`; every optional field None, sizes, latency and cost 0.
    /// Callers fill in the rest with struct update syntax or field assignments.
    pub fn new(tenant_id: TenantId, rpc: impl Into<String>, grpc_code: i16) -> Self {
        RequestRecord {
            // Monotonic within the process, unlike a v7 built from a clock reading.
            id: Uuid::now_v7(),
            ..Self::at(Utc::now(), tenant_id, rpc, grpc_code)
        }
    }

    /// Like [`RequestRecord::new`] with an explicit time (the UUIDv7 carries that time too).
    pub fn at(
        time: DateTime<Utc>,
        tenant_id: TenantId,
        rpc: impl Into<String>,
        grpc_code: i16,
    ) -> Self {
        let ts = uuid::Timestamp::from_unix(
            uuid::NoContext,
            u64::try_from(time.timestamp()).unwrap_or(0),
            time.timestamp_subsec_nanos(),
        );
        RequestRecord {
            id: Uuid::new_v7(ts),
            time,
            tenant_id,
            api_key_id: None,
            user_id: None,
            rpc: rpc.into(),
            http_method: None,
            http_path: None,
            grpc_code,
            http_status: http_status_for(grpc_code),
            error_code: None,
            latency_us: 0,
            request_bytes: 0,
            response_bytes: 0,
            client_ip: None,
            user_agent: None,
            cost: 0,
            service_caller: None,
        }
    }

    /// The HTTP status Envoy's transcoder maps `grpc_code` to (see [`http_status_for`]).
    pub fn http_status_for(grpc_code: i16) -> i16 {
        http_status_for(grpc_code)
    }
}

/// The HTTP status Envoy's `grpc_json_transcoder` (with `convert_grpc_status`) answers for a
/// gRPC status code: OK 200; INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE 400;
/// UNAUTHENTICATED 401; PERMISSION_DENIED 403; NOT_FOUND 404; ALREADY_EXISTS, ABORTED 409;
/// RESOURCE_EXHAUSTED 429; CANCELLED 499; UNIMPLEMENTED 501; UNAVAILABLE 503;
/// DEADLINE_EXCEEDED 504; everything else (UNKNOWN, INTERNAL, DATA_LOSS, unknown codes) 500.
pub fn http_status_for(grpc_code: i16) -> i16 {
    match grpc_code {
        0 => 200,          // OK
        1 => 499,          // CANCELLED
        3 | 9 | 11 => 400, // INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE
        4 => 504,          // DEADLINE_EXCEEDED
        5 => 404,          // NOT_FOUND
        6 | 10 => 409,     // ALREADY_EXISTS, ABORTED
        7 => 403,          // PERMISSION_DENIED
        8 => 429,          // RESOURCE_EXHAUSTED
        12 => 501,         // UNIMPLEMENTED
        14 => 503,         // UNAVAILABLE
        16 => 401,         // UNAUTHENTICATED
        _ => 500,          // UNKNOWN, INTERNAL, DATA_LOSS, anything else
    }
}

/// Totals over a tenant's calls in a time range.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageSummary {
    pub requests: i64,
    /// Calls whose gRPC code was not OK.
    pub errors: i64,
    pub cost_total: i64,
    pub by_status_class: StatusClasses,
    /// None when there were no calls.
    pub latency_p50_us: Option<f64>,
    pub latency_p99_us: Option<f64>,
}

/// Call counts by the class of their HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusClasses {
    pub status_2xx: i64,
    pub status_4xx: i64,
    pub status_5xx: i64,
}

/// What a breakdown groups by. Time buckets are UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupBy {
    /// Key: the API key id; "" for calls made without a key (users with a JWT).
    ApiKey,
    /// Key: the RPC path.
    Endpoint,
    /// Key: the start of the UTC day, RFC 3339 (`2026-11-22T00:00:00Z`).
    Day,
    /// Key: the start of the UTC hour, RFC 3339 (`2026-11-22T13:00:00Z`).
    Hour,
}

/// One group of a breakdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakdownRow {
    pub key: String,
    pub requests: i64,
    pub errors: i64,
    pub cost: i64,
}

/// Narrows a listing; every field None means no restriction. `from` is inclusive, `to`
/// exclusive.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    pub api_key_id: Option<String>,
    pub grpc_code: Option<i16>,
    pub rpc: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}
