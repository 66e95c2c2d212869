ALTER TABLE tenants
    DROP COLUMN rate_limit_per_minute, DROP COLUMN rate_limit_per_hour,
    DROP COLUMN rate_limit_per_day, DROP COLUMN rate_limit_burst, DROP COLUMN update_time;
ALTER TABLE api_keys
    DROP COLUMN rate_limit_per_minute, DROP COLUMN rate_limit_per_hour,
    DROP COLUMN rate_limit_per_day, DROP COLUMN rate_limit_burst;
