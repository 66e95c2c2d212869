-- Per-tenant monthly quotas over the plan's (NULL: the plan decides). Set by SetPlan.
ALTER TABLE tenants
    ADD COLUMN quota_monthly_requests    bigint CHECK (quota_monthly_requests > 0),
    ADD COLUMN quota_monthly_generations bigint CHECK (quota_monthly_generations > 0);
