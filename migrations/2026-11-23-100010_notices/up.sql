-- Notices devgate sends on its own, each at most once: the row is inserted in the
-- transaction of the event it announces (ON CONFLICT DO NOTHING: no row, no event), so
-- replicas, concurrent calls and the worker's periodic checks never send one twice.

-- `usage.quota.warning` (80 %) and `usage.quota.exceeded`: once per tenant, quota and month.
CREATE TABLE quota_notices (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    metric      text NOT NULL CHECK (metric IN ('monthly_requests', 'monthly_generations')),
    -- The first day of the month (UTC) the quota counts.
    month       date NOT NULL,
    level       text NOT NULL CHECK (level IN ('warning', 'exceeded')),
    quota_limit bigint NOT NULL,
    used        bigint NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, metric, month, level)
);
-- The worker's check reads one month's notices.
CREATE INDEX quota_notices_month_idx ON quota_notices (month);

-- `api_key.expiring`: once per key and expiry; a key given a new expire_time may get another.
CREATE TABLE api_key_expiring_notices (
    api_key_id  text NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    expire_time timestamptz NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (api_key_id, expire_time)
);

-- The worker's scan for live keys expiring soon, across tenants.
CREATE INDEX api_keys_expire_time_idx ON api_keys (expire_time)
    WHERE expire_time IS NOT NULL AND revoke_time IS NULL;
