-- The request log: one row per authenticated call, written in batches by the request-log
-- writer (src/usage/log.rs) and read by the usage summaries, breakdowns and listings.
-- RANGE-partitioned by month on "time" (UTC month boundaries): retention drops whole
-- partitions instead of deleting rows. No foreign key to tenants: the log is history, and
-- one missing tenant row must not make a whole batch of other tenants' rows fail.
CREATE TABLE api_request_logs (
    id             uuid NOT NULL,          -- UUIDv7, chosen by the application
    time           timestamptz NOT NULL,
    tenant_id      uuid NOT NULL,
    api_key_id     text,                   -- NULL for user (JWT) calls
    user_id        text,
    rpc            text NOT NULL,          -- e.g. /devgate.v1.ApiKeyService/ListApiKeys
    http_method    text,                   -- x-envoy-original-method; NULL unless transcoded
    http_path      text,                   -- x-envoy-original-path; NULL unless transcoded
    grpc_code      smallint NOT NULL,
    http_status    smallint NOT NULL,      -- the status Envoy maps grpc_code to
    error_code     text,                   -- google.rpc.ErrorInfo reason, if any
    latency_us     integer NOT NULL,
    request_bytes  integer NOT NULL,
    response_bytes integer NOT NULL,
    client_ip      inet,
    user_agent     text,
    cost           bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, time, id)
) PARTITION BY RANGE (time);

-- Per-key usage and listings filtered by key, newest first.
CREATE INDEX api_request_logs_tenant_key_time ON api_request_logs (tenant_id, api_key_id, time DESC);

-- Catch-all so an insert never fails for lack of a monthly partition. Rows landing here are
-- a bug (partition maintenance did not run, or a clock far off): the worker logs a warning
-- when this partition is not empty, and devgate_request_log_partitions moves its rows into
-- the monthly partition it creates for them.
CREATE TABLE api_request_logs_default PARTITION OF api_request_logs DEFAULT;

-- Creates the monthly partitions api_request_logs_YYYY_MM (UTC months) from the month
-- containing now() - retain up to months_ahead months after the current month, and drops
-- the monthly partitions whose whole range ends at or before now() - retain. Idempotent and
-- serialised by an advisory lock, so every replica may run it.
CREATE FUNCTION devgate_request_log_partitions(months_ahead int, retain interval)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    cutoff      timestamp := (now() - retain) AT TIME ZONE 'UTC';
    first_month timestamp := date_trunc('month', (now() - retain) AT TIME ZONE 'UTC');
    last_month  timestamp := date_trunc('month', now() AT TIME ZONE 'UTC')
                             + make_interval(months => greatest(months_ahead, 0));
    month_start timestamp;
    month_end   timestamp;
    part        text;
    lower_bound text;
    upper_bound text;
    old         record;
BEGIN
    IF retain < interval '0' THEN
        RAISE EXCEPTION 'retain must not be negative (got %)', retain;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('devgate_request_log_partitions'));

    -- Drop the partitions whose range [month, month + 1 month) ends before the cutoff.
    FOR old IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'api_request_logs'::regclass
          AND c.relname ~ '^api_request_logs_[0-9]{4}_[0-9]{2}$'
          AND to_timestamp(substr(c.relname, 18), 'YYYY_MM')::timestamp
              + interval '1 month' <= cutoff
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE %I', old.relname);
    END LOOP;
    -- Stray rows in the default partition older than the retained months go the same way.
    DELETE FROM api_request_logs_default WHERE "time" < first_month AT TIME ZONE 'UTC';

    month_start := first_month;
    WHILE month_start <= last_month LOOP
        month_end := month_start + interval '1 month';
        part := 'api_request_logs_' || to_char(month_start, 'YYYY_MM');
        lower_bound := to_char(month_start, 'YYYY-MM-DD') || ' 00:00:00+00';
        upper_bound := to_char(month_end, 'YYYY-MM-DD') || ' 00:00:00+00';
        IF to_regclass(part) IS NULL THEN
            IF EXISTS (
                SELECT 1 FROM api_request_logs_default
                WHERE "time" >= month_start AT TIME ZONE 'UTC'
                  AND "time" < month_end AT TIME ZONE 'UTC'
            ) THEN
                -- Rows for this month are in the default partition, where a new partition
                -- of the month would conflict with them: move them into a new table first,
                -- then attach it (which also creates the parent's indexes on it).
                EXECUTE format('CREATE TABLE %I (LIKE api_request_logs INCLUDING DEFAULTS)', part);
                EXECUTE format(
                    'WITH moved AS (DELETE FROM api_request_logs_default'
                    ' WHERE "time" >= %L AND "time" < %L RETURNING *)'
                    ' INSERT INTO %I SELECT * FROM moved',
                    lower_bound, upper_bound, part);
                EXECUTE format(
                    'ALTER TABLE api_request_logs ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                    part, lower_bound, upper_bound);
            ELSE
                EXECUTE format(
                    'CREATE TABLE IF NOT EXISTS %I PARTITION OF api_request_logs'
                    ' FOR VALUES FROM (%L) TO (%L)',
                    part, lower_bound, upper_bound);
            END IF;
        END IF;
        month_start := month_end;
    END LOOP;
END;
$$;

SELECT devgate_request_log_partitions(2, interval '90 days');
