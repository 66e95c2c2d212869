DROP FUNCTION devgate_request_log_partitions(int, interval);
DROP TABLE api_request_logs;
