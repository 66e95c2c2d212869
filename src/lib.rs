//! devgate: the developer platform service (API keys, webhooks, usage and quotas, the
//! creative-generation proxy), gRPC-first behind an Envoy REST edge.
//!
//! Features live in their own modules (`api_keys`, ...), each split into model (domain
//! types), store (diesel), service (logic) and grpc (the thin tonic layer). Infrastructure
//! is by layer: `db`, `kv` (Redis), `auth`, `telemetry`.

pub mod api_keys;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod credits;
pub mod db;
pub mod edge;
pub mod events;
pub mod generation;
pub mod health;
pub mod idempotency;
pub mod identity;
pub mod kv;
pub mod mq;
pub mod pagination;
pub mod proto;
pub mod ratelimit;
pub mod status;
pub mod supervise;
pub mod telemetry;
pub mod tenants;
pub mod usage;
pub mod validation;
pub mod webhooks;

pub use app::Application;
pub use config::Config;
