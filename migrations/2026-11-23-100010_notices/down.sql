DROP INDEX api_keys_expire_time_idx;
DROP TABLE api_key_expiring_notices;
DROP TABLE quota_notices;
