#!/usr/bin/env bash
# The physical limit of the rate limiter on this machine: redis-benchmark running EVALSHA of
# devgate's own script (src/ratelimit/token_bucket.lua: three token buckets and the monthly
# quota counter) with the arguments the loadgen's keys produce (no call refused), at the same
# concurrency, over as many distinct keys as clients. Prints one JSON line: {"rps":…,"p50_ms":…,"p99_ms":…}.
#
#   benches/redis_limit_baseline.sh [--concurrency 64] [--requests 300000]
#
# Compare with `cargo run --release --example loadgen -- authorize --concurrency 64`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

concurrency=64
requests=300000
host=127.0.0.1
port=6379
while [ $# -gt 0 ]; do
    case "$1" in
        --concurrency) concurrency="$2"; shift 2 ;;
        --requests) requests="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        *) echo "usage: $0 [--concurrency N] [--requests N] [--port P]" >&2; exit 2 ;;
    esac
done
command -v redis-benchmark >/dev/null || { echo "redis-benchmark is missing (Debian: redis-tools)" >&2; exit 1; }

prefix="devgate-bench-$$:"
cleanup() {
    redis-cli -h "$host" -p "$port" --scan --pattern "${prefix}*" | xargs -r -n 500 redis-cli -h "$host" -p "$port" DEL >/dev/null
}
trap cleanup EXIT

sha=$(redis-cli -h "$host" -p "$port" SCRIPT LOAD "$(cat src/ratelimit/token_bucket.lua)")
# The loadgen key's limits: 100 000 000 per minute/hour/day, burst 100 000 000, and its
# tenant's monthly quota (10^12 requests): cost 1, 1 quota unit, the quota's limit and the
# counter's expiry, then each window's capacity and refill per ms, as
# src/ratelimit/limiter.rs passes them. Two keys per call, like the hot path.
limit=100000000
expiry=$(( ($(date +%s) + 40 * 86400) * 1000 ))
args=(1 1 1000000000000 "$expiry"
    "$limit" "$(python3 -c "print($limit / 60000)")"
    "$limit" "$(python3 -c "print($limit / 3600000)")"
    "$limit" "$(python3 -c "print($limit / 86400000)")")

csv=$(redis-benchmark -h "$host" -p "$port" -c "$concurrency" -n "$requests" -r "$concurrency" --csv \
    EVALSHA "$sha" 2 "${prefix}rl:{__rand_int__}:key" "${prefix}quota:{__rand_int__}:monthly_requests" "${args[@]}")
# "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
echo "$csv" | tail -n 1 | python3 -c '
import csv, json, sys
row = next(csv.reader(sys.stdin))
print(json.dumps({"rps": float(row[1]), "p50_ms": float(row[4]), "p99_ms": float(row[6])}))
'
