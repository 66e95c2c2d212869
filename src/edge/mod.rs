//! Per-call concerns at the edge of the service, shared by the auth and usage layers.

pub mod client_ip;
