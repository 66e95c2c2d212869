ALTER TABLE api_request_logs DROP COLUMN service_caller;
ALTER TABLE metered_usage DROP COLUMN recorded_by;
ALTER TABLE tenants DROP COLUMN plan_updated_by;
ALTER TABLE credit_ledger DROP COLUMN created_by;
