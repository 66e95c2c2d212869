-- Every row an internal caller creates names it (`service:<caller>`), and so does the
-- request log: internal callers authenticate, so their names can be trusted and audited.
ALTER TABLE credit_ledger ADD COLUMN created_by text NOT NULL DEFAULT ''
    CHECK (char_length(created_by) <= 200);
ALTER TABLE tenants ADD COLUMN plan_updated_by text
    CHECK (char_length(plan_updated_by) <= 200);
ALTER TABLE metered_usage ADD COLUMN recorded_by text
    CHECK (char_length(recorded_by) <= 200);
-- The internal caller that made (or gated) the call; NULL for developers' own calls.
ALTER TABLE api_request_logs ADD COLUMN service_caller text;
