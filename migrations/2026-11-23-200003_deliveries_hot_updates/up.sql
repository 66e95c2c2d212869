-- A delivery row changes its status once or twice; an index that names `status` (the partial
-- index on failed deliveries) makes every such UPDATE a non-HOT update with new index entries
-- and dead tuples (measured under the webhooks benchmark: 35 % HOT, 1.26 M dead rows).
-- RecoverWebhookDeliveries finds an endpoint's failed deliveries since T through
-- webhook_deliveries_endpoint_idx (endpoint, id: UUIDv7 ids are in time order) instead.
DROP INDEX webhook_deliveries_failed_idx;
ALTER TABLE webhook_deliveries SET (fillfactor = 80);
