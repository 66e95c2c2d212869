-- Per-key rate-limit overrides (NULL: the tenant's plan decides) and per-tenant limits
-- (set by SetPlan; how enterprise tenants get theirs).
ALTER TABLE api_keys
    ADD COLUMN rate_limit_per_minute integer CHECK (rate_limit_per_minute > 0),
    ADD COLUMN rate_limit_per_hour   integer CHECK (rate_limit_per_hour > 0),
    ADD COLUMN rate_limit_per_day    integer CHECK (rate_limit_per_day > 0),
    ADD COLUMN rate_limit_burst      integer CHECK (rate_limit_burst > 0);

ALTER TABLE tenants
    ADD COLUMN rate_limit_per_minute integer CHECK (rate_limit_per_minute > 0),
    ADD COLUMN rate_limit_per_hour   integer CHECK (rate_limit_per_hour > 0),
    ADD COLUMN rate_limit_per_day    integer CHECK (rate_limit_per_day > 0),
    ADD COLUMN rate_limit_burst      integer CHECK (rate_limit_burst > 0),
    ADD COLUMN update_time           timestamptz NOT NULL DEFAULT now();
