#!/usr/bin/env bash
# deploy/local/test.sh — what CI runs (.ci/run): prepare the machine (common.sh), then
# rustfmt, clippy and the whole test suite (debug build) against the local services.
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail

# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" # also cd's to the repository root

if [ "${CI:-}" = "true" ]; then
    export CARGO_TERM_COLOR=never
fi

# DEVGATE_TEST_ENVOY and DEVGATE_TEST_GRPCURL are exported by common.sh.
export DEVGATE_TEST_DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/postgres"
export DEVGATE_TEST_REDIS_URL="redis://127.0.0.1:6379"

cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing (rustup component add rustfmt)"
cargo clippy --version >/dev/null 2>&1 || die "clippy is missing (rustup component add clippy)"

log "cargo fmt --check"
cargo fmt --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

log "cargo test --all-targets"
# Each test target prints its own summary (the last, the load-generator example's, has no
# tests); the closing line sums them up for the whole run.
results="$(mktemp)"
trap 'rm -f "$results"' EXIT
cargo test --all-targets "$@" 2>&1 | tee "$results"
if [ "$#" -eq 0 ]; then
    # Tests that disturb the shared services (RabbitMQ stop_app/start_app) are #[ignore]d in
    # the parallel run and run here, one at a time, with nothing else using the broker.
    log "cargo test --test it -- --ignored --test-threads=1"
    cargo test --test it -- --ignored --test-threads=1 2>&1 | tee -a "$results"
fi
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$results"
