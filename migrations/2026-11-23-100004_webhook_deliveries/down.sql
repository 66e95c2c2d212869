DROP TRIGGER webhook_endpoints_notify ON webhook_endpoints;
DROP FUNCTION webhook_endpoints_notify();
DROP TABLE webhook_attempts;
DROP TABLE webhook_deliveries;
ALTER TABLE events DROP COLUMN endpoint_id;
