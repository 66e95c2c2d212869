-- The inserting transaction's id on every request-log row, so the quota reconciler reads only
-- the rows committed since its last pass (src/ratelimit/quota.rs explains the watermark).
-- Added without a default first (no table rewrite): rows written before this migration keep
-- NULL and are counted only by a reconciler's first, full pass of the month.
ALTER TABLE api_request_logs ADD COLUMN insert_xid xid8;
ALTER TABLE api_request_logs ALTER COLUMN insert_xid SET DEFAULT pg_current_xact_id();
CREATE INDEX api_request_logs_insert_xid ON api_request_logs (insert_xid);
