#!/usr/bin/env bash
# deploy/local/run.sh — run the whole local stack in the foreground:
#   Postgres, Redis, RabbitMQ (installed/started by common.sh if needed),
#   the upstream simulator (devgate-upstream-sim: the AI orchestrator on RabbitMQ and the
#   Asset and User/Team gRPC services devgate calls), devgate (`all --migrate`: gRPC API +
#   worker) and Envoy (the REST edge).
# Ctrl-C stops the simulator, devgate and Envoy (the services started by common.sh keep
# running).
# Works from any directory.
set -euo pipefail

# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" # also cd's to the repository root

env_file=deploy/local/devgate.env

for port in 50051 50052 50061 50062 8080 9901; do
    if tcp_open "$port"; then
        die "127.0.0.1:$port is already in use (is another devgate, simulator or Envoy running?)"
    fi
done

log "building devgate and the upstream simulator (release)"
cargo build --release --bin devgate --bin devgate-upstream-sim

log "writing the protobuf descriptor for Envoy: target/devgate.pb"
target/release/devgate --env-file "$env_file" descriptor --out target/devgate.pb

children=()
stop_children() {
    local pid i
    trap - EXIT INT TERM
    for pid in "${children[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # Give them 10 s to shut down gracefully, then kill what is left.
    for pid in "${children[@]}"; do
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap stop_children EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_port NAME PID PORT SECONDS: wait until PORT accepts TCP; fail early if PID died.
wait_port() {
    local name="$1" pid="$2" port="$3" secs="$4" i
    for ((i = 0; i < secs * 4; i++)); do
        kill -0 "$pid" 2>/dev/null || die "$name exited before listening on 127.0.0.1:$port"
        if tcp_open "$port"; then
            return 0
        fi
        sleep 0.25
    done
    die "$name did not listen on 127.0.0.1:$port within ${secs}s"
}

# The simulator reads devgate's env file: it listens on DEVGATE_ASSET_SERVICE_ADDR and
# DEVGATE_USER_TEAM_SERVICE_ADDR and uses devgate's RabbitMQ names. Its one stdout line (the
# addresses and the local tenant's seeded ids) goes to target/upstream-sim.json.
log "starting the upstream simulator"
rm -f target/upstream-sim.json
target/release/devgate-upstream-sim --env-file "$env_file" >target/upstream-sim.json &
sim_pid=$!
children+=("$sim_pid")
wait_port devgate-upstream-sim "$sim_pid" 50061 30
wait_port devgate-upstream-sim "$sim_pid" 50062 30

log "starting devgate (all --migrate)"
target/release/devgate --env-file "$env_file" all --migrate &
devgate_pid=$!
children+=("$devgate_pid")
wait_port devgate "$devgate_pid" 50051 60

log "starting Envoy"
"$root/.venv/bin/envoy" -c envoy/envoy.yaml --base-id 11 --log-level warn &
envoy_pid=$!
children+=("$envoy_pid")
wait_port Envoy "$envoy_pid" 8080 30

cat <<ENDPOINTS

devgate local stack is up (repository: $root)
  REST (Envoy)     http://127.0.0.1:8080
  public gRPC      127.0.0.1:50051  (reflection: .venv/bin/grpcurl -plaintext 127.0.0.1:50051 list)
  internal gRPC    127.0.0.1:50052  (internal callers only; never behind Envoy)
  Envoy admin      http://127.0.0.1:9901
  upstream sim     Asset 127.0.0.1:50061, User/Team 127.0.0.1:50062 (reflection), orchestrator
                   on RabbitMQ; seeded ids of the local tenant: target/upstream-sim.json

Quick start (from $root):
ENDPOINTS
cat <<'QUICKSTART'
  TOKEN=$(target/release/devgate --env-file deploy/local/devgate.env dev-token --tenant 00000000-0000-0000-0000-000000000001 --user alice --roles admin)
  curl -s -X POST http://127.0.0.1:8080/v1/api-keys -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' -d '{"name":"my first key","scopes":["*"],"environment":"ENVIRONMENT_TEST"}'
  curl -s http://127.0.0.1:8080/v1/api-keys -H "authorization: Bearer $TOKEN"
  .venv/bin/grpcurl -plaintext -d '{"tenant_id":"00000000-0000-0000-0000-000000000001","page_size":2}' 127.0.0.1:50061 upstream.assets.v1.AssetService/ListAssets

Press Ctrl-C to stop the simulator, devgate and Envoy.
QUICKSTART

# Block until Ctrl-C, or until one of them exits: the EXIT trap then stops the others.
status=0
wait -n "${children[@]}" || status=$?
log "the simulator, devgate or Envoy exited (status $status); stopping the stack"
exit "$status"
