#!/usr/bin/env bash
# The quota reconciler's Postgres side: a full pass of the month (what every pass did before)
# against an incremental pass that reads only rows committed since the last one. Runs the two
# queries of src/ratelimit/quota.rs (committed_key_requests) on a scratch database created
# from the migrated test template, with --rows request-log rows this month (1000 tenants)
# and --new rows added after the first pass. Prints one JSON line with both times (ms).
#
#   benches/reconcile_baseline.sh [--rows 1000000] [--new 1000]
#
# Needs the test template (run any integration test once) and psql.
set -euo pipefail

admin=${DEVGATE_TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
base=${admin%/*}
rows=1000000
new=1000
while [ $# -gt 0 ]; do
    case "$1" in
        --rows) rows="$2"; shift 2 ;;
        --new) new="$2"; shift 2 ;;
        *) echo "usage: $0 [--rows N] [--new N]" >&2; exit 2 ;;
    esac
done

template=$(psql "$admin" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'devgate_tmpl_%' ORDER BY datname DESC LIMIT 1")
[ -n "$template" ] || { echo "no devgate_tmpl_* database: run an integration test first" >&2; exit 1; }
db="devgate_bench_reconcile_$$"
psql "$admin" -qc "CREATE DATABASE $db TEMPLATE $template"
trap 'psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
url="$base/$db"

insert() { # $1 rows
    psql "$url" -qc "
      INSERT INTO api_request_logs (id, time, tenant_id, api_key_id, rpc, grpc_code, http_status,
                                    latency_us, request_bytes, response_bytes)
      SELECT gen_random_uuid(),
             date_trunc('month', now()) + random() * (now() - date_trunc('month', now())),
             ('00000000-0000-4000-8000-' || lpad((i % 1000)::text, 12, '0'))::uuid,
             'key' || (i % 5000), '/devgate.v1.ApiKeyService/ListApiKeys', 0, 200, 100, 10, 10
      FROM generate_series(1, $1) AS i"
}

insert "$rows"
psql "$url" -qc "VACUUM ANALYZE api_request_logs"
count="SELECT tenant_id, count(*) AS requests FROM api_request_logs
       WHERE time >= date_trunc('month', now()) AND time < date_trunc('month', now()) + interval '1 month'
         AND api_key_id IS NOT NULL AND grpc_code <> 8 AND"
horizon=$(psql "$url" -Atc "SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
ms() { # the server-side execution time of $1, best of 3
    for _ in 1 2 3; do
        psql "$url" -Atc "EXPLAIN (ANALYZE, FORMAT JSON) $1" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Execution Time"])'
    done | sort -g | head -n 1
}
full=$(ms "$count (insert_xid IS NULL OR insert_xid < '$horizon'::xid8) GROUP BY tenant_id")
insert "$new"
next=$(psql "$url" -Atc "SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
incremental=$(ms "$count insert_xid >= '$horizon'::xid8 AND insert_xid < '$next'::xid8 GROUP BY tenant_id")
echo "{\"rows\":$rows,\"new_rows\":$new,\"full_pass_ms\":$full,\"incremental_pass_ms\":$incremental}"
