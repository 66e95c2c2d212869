//! Integration and end-to-end tests: one test binary, every test on its own database (from a
//! migrated template), its own Redis key prefix and its own server instances; end-to-end
//! tests start their own Envoy in front.

mod harness;

mod api_keys;
mod auth;
mod credits;
mod edge;
mod faults;
mod grpcurl;
mod hot_path;
mod quickstart;
mod quota;
mod ratelimit;
mod usage;
mod usage_log;
