DROP INDEX api_request_logs_insert_xid;
ALTER TABLE api_request_logs DROP COLUMN insert_xid;
