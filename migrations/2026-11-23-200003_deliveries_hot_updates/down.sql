ALTER TABLE webhook_deliveries RESET (fillfactor);
CREATE INDEX webhook_deliveries_failed_idx ON webhook_deliveries (endpoint_id, create_time)
    WHERE status = 'failed';
