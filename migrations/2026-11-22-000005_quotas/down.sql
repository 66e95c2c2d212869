ALTER TABLE tenants DROP COLUMN quota_monthly_requests, DROP COLUMN quota_monthly_generations;
