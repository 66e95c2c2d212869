//! Per-call concerns at the edge of the service: the request context (caller identity,
//! client IP), the auth layer that resolves it and the usage layer that records each call. Above the features: it imports them,
//! they import none of it except the client-IP and context types.

pub mod auth;
pub mod client_ip;
pub mod context;
pub mod usage;
