//! Integration and end-to-end tests: one test binary, every test on its own database (from a
//! migrated template), its own Redis key prefix and its own server instances; end-to-end
//! tests start their own Envoy in front.

mod harness;

mod api_key_events;
mod api_keys;
mod auth;
mod bounded;
mod catalog;
mod ceiling;
mod cluster;
mod credits;
mod directory;
mod edge;
mod events;
mod faults;
mod generation_faults;
mod generation_updates;
mod generations;
mod group_commit;
mod grpcurl;
mod health;
mod hot_path;
mod idempotency;
mod internal;
mod jwt;
mod layering;
mod quickstart;
mod quota;
mod quota_events;
mod ratelimit;
mod reconcile;
mod relay;
mod rotation;
mod transactions;
mod upstream_clients;
mod upstream_sim;
mod usage;
mod usage_log;
mod webhook_deliveries;
mod webhook_delivery;
mod webhook_faults;
mod webhook_signing;
mod webhook_ssrf;
mod webhooks;
