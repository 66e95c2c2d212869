#!/usr/bin/env bash
# The physical limit of CreateGeneration's Postgres work on this machine: pgbench running the
# statements devgate sends for one create (src/idempotency/store.rs reserve and complete,
# src/credits/store.rs debit, src/generation/store.rs insert, src/events/outbox.rs enqueue and
# append; the order of src/generation/service.rs `create`), prepared, at the same concurrency,
# for one tenant (the loadgen's `generate` uses one tenant too, so both contend on its balance
# row), on a scratch database migrated by devgate itself and dropped at the end.
# Prints one JSON line: {"tps":…,"latency_avg_ms":…,"concurrency":…,"seconds":…}; one pgbench
# transaction is one whole create.
#
#   benches/pg_generation_baseline.sh [--concurrency 64] [--seconds 10]
#
# Compare with `cargo run --release --example loadgen -- generate --concurrency 64 --seconds 10`.
# Needs a release build of devgate (for its migrations), psql and pgbench.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

admin=${DEVGATE_TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
base=${admin%/*}
concurrency=64
seconds=10
while [ $# -gt 0 ]; do
    case "$1" in
        --concurrency) concurrency="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        *) echo "usage: $0 [--concurrency N] [--seconds N]" >&2; exit 2 ;;
    esac
done
command -v pgbench >/dev/null || { echo "pgbench is missing (Debian: postgresql-client)" >&2; exit 1; }

devgate=${DEVGATE_BIN:-target/release/devgate}
[ -x "$devgate" ] || { echo "$devgate is missing: cargo build --release (or set DEVGATE_BIN)" >&2; exit 1; }
db="devgate_bench_generation_$$"
dir=$(mktemp -d)
cleanup() {
    psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
psql "$admin" -qc "CREATE DATABASE $db"
url="$base/$db"
# The schema exactly as devgate migrates it (its embedded migrations).
DEVGATE_DATABASE_URL="$url" "$devgate" --env-file deploy/local/devgate.env migrate >/dev/null

# The loadgen's tenant: a row, and credits for far more creates than any run makes.
tenant=$(python3 -c 'import uuid; print(uuid.uuid4())')
psql "$url" -qc "INSERT INTO tenants (id) VALUES ('$tenant');
                 INSERT INTO credit_balances (tenant_id, balance) VALUES ('$tenant', 1000000000)"

# pgbench reads `:name` as a variable even inside string literals, so values with a colon
# (the actor) are variables (-D) too.
# A UUIDv7 made by the server (devgate makes its ids v7 client-side: ids in time order).
v7="encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
        placing substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
        FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid"
# What the loadgen sends: one `image`, `png`, 10 credits, the request's hash and response
# (the encoded Generation, ~190 bytes) and the orchestrator job (~170 bytes) as bytes.
cat >"$dir/create.sql" <<SQL
-- Idempotency::begin: the key reserved in a statement of its own (autocommit).
INSERT INTO idempotency_keys (tenant_id, key, rpc, request_hash, state, lease_id, lease_until,
                              create_time, expire_time)
VALUES (:tenant, md5(random()::text || clock_timestamp()::text),
        'devgate.v1.GenerationProxy/CreateGeneration', sha256(random()::text::bytea), 'in_flight',
        gen_random_uuid(), now() + interval '60 seconds', now(), now() + interval '24 hours')
ON CONFLICT (tenant_id, key) DO UPDATE SET
    rpc = excluded.rpc, request_hash = excluded.request_hash, state = 'in_flight',
    lease_id = excluded.lease_id, lease_until = excluded.lease_until, response = NULL,
    resource_id = NULL, create_time = excluded.create_time, expire_time = excluded.expire_time
WHERE (idempotency_keys.state = 'in_flight' AND idempotency_keys.lease_until < now())
   OR idempotency_keys.expire_time <= now()
RETURNING lease_id AS lease, key AS idem, ($v7)::text AS gid
\gset
BEGIN;
-- credits::store::debit: the replay check, then the conditional update and the ledger entry
-- in a savepoint (diesel's nested transaction).
SELECT id, tenant_id, amount, reason, reference, idempotency_id, balance_after, create_time, created_by
FROM credit_ledger WHERE tenant_id = :tenant AND idempotency_id = 'generation:' || :gid LIMIT 1;
SAVEPOINT diesel_savepoint_1;
UPDATE credit_balances SET balance = balance - 10, update_time = now()
WHERE tenant_id = :tenant AND balance >= 10
RETURNING balance AS balance_after
\gset
INSERT INTO credit_ledger (tenant_id, amount, reason, reference, idempotency_id, balance_after,
                           created_by, create_time)
VALUES (:tenant, -10, 'generation', :gid, 'generation:' || :gid, :balance_after,
        :actor, clock_timestamp())
ON CONFLICT (tenant_id, idempotency_id) DO NOTHING
RETURNING id, tenant_id, amount, reason, reference, idempotency_id, balance_after, create_time, created_by;
RELEASE SAVEPOINT diesel_savepoint_1;
-- generation::store::insert
INSERT INTO generations (id, tenant_id, kind, prompt, output_format, style, count, project_id,
                         metadata, state, cost, created_by, create_time, update_time)
VALUES (:gid::uuid, :tenant, 'image', 'a lighthouse at dusk, loadgen', 'png', '{}', 1, '', '{}',
        'queued', 10, :actor, now(), now())
RETURNING *;
-- events::outbox::enqueue: the orchestrator's job.
INSERT INTO outbox (exchange, routing_key, body, content_type, message_type, message_id)
VALUES ('bench.generation.jobs', 'generation.requested', decode(repeat('0a', 170), 'hex'),
        'application/x-protobuf', 'upstream.orchestrator.v1.GenerationJob', :gid);
-- Emitter::emit → events::outbox::append: the tenant ensured, then the generation.queued
-- event and its outbox row in one statement.
INSERT INTO tenants (id) VALUES (:tenant) ON CONFLICT DO NOTHING;
WITH ins AS (
    INSERT INTO events (id, tenant_id, event_type, payload, idempotency_id, source, endpoint_id)
    VALUES ($v7, :tenant, 'generation.queued',
            jsonb_build_object('generation_id', :gid::text, 'model', 'image', 'modality', 'image',
                               'api_key_id', 'LoadgenKey01', 'metadata', '{}'::jsonb,
                               'prompt_excerpt', 'a lighthouse at dusk, loadgen',
                               'credits_charged', 10, 'queue_time', now()),
            NULL, 'devgate', NULL)
    ON CONFLICT (tenant_id, idempotency_id) DO NOTHING
    RETURNING *
), queued AS (
    INSERT INTO outbox (event_id) SELECT id FROM ins
)
SELECT * FROM ins;
-- Guard::complete: the key completed with the response, in the same transaction.
UPDATE idempotency_keys SET state = 'completed', lease_until = NULL,
       response = decode(repeat('0b', 190), 'hex'), resource_id = :gid
WHERE tenant_id = :tenant AND key = :idem AND lease_id = :lease AND state = 'in_flight';
COMMIT;
SQL

# Two pgbench threads (the machine's cores); every client its own connection, like a pool
# of `--concurrency` (devgate's default pool is 16 per process: the baseline is the limit).
out=$(pgbench -n -M prepared -c "$concurrency" -j 2 -T "$seconds" -D tenant="$tenant" \
    -D actor=api_key:LoadgenKey01 \
    -f "$dir/create.sql" "$url" 2>"$dir/stderr") || { cat "$dir/stderr" >&2; echo "$out" >&2; exit 1; }
failed=$(echo "$out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p')
if [ -n "$failed" ] && [ "$failed" != 0 ]; then
    echo "$out" >&2
    echo "pgbench: $failed failed transactions" >&2
    exit 1
fi
tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p')
latency=$(echo "$out" | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p')
[ -n "$tps" ] || { echo "$out" >&2; echo "no tps in pgbench's output" >&2; exit 1; }
# Every committed create wrote all of it: one ledger entry, one event, two outbox rows and a
# completed key per generation.
read -r created entries events queued keys < <(psql "$url" -AtF ' ' -c "
    SELECT (SELECT count(*) FROM generations), (SELECT count(*) FROM credit_ledger),
           (SELECT count(*) FROM events), (SELECT count(*) FROM outbox),
           (SELECT count(*) FROM idempotency_keys WHERE state = 'completed')")
if [ "$entries" != "$created" ] || [ "$events" != "$created" ] || [ "$queued" != $((2 * created)) ] || [ "$keys" != "$created" ]; then
    echo "inconsistent: $created generations, $entries ledger entries, $events events, $queued outbox rows, $keys keys" >&2
    exit 1
fi
echo "{\"tps\":$tps,\"latency_avg_ms\":${latency:-null},\"generations\":$created,\"concurrency\":$concurrency,\"seconds\":$seconds}"
