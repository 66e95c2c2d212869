-- A test event (SendTestEvent) goes to one endpoint only, whatever it subscribes to.
ALTER TABLE events ADD COLUMN endpoint_id uuid REFERENCES webhook_endpoints (id) ON DELETE CASCADE;

-- One row per (event, endpoint) the fan-out matched: the delivery's state. The attempts
-- themselves are in webhook_attempts. Ids are UUIDv7. `webhook-id` on the wire is the event
-- id, the same on every attempt (and for every endpoint), so receivers deduplicate by it.
CREATE TABLE webhook_deliveries (
    id                uuid PRIMARY KEY,
    tenant_id         uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    endpoint_id       uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id          uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    event_type        text NOT NULL,
    -- pending: an attempt is queued or scheduled; succeeded / failed are final until a
    -- manual retry or a recover re-opens them.
    status            text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'succeeded', 'failed')),
    -- Attempts made so far; a queued task carries the number of the attempt it is for, and a
    -- task whose number is not greater is a duplicate (dropped).
    attempts          integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- A worker holding the delivery (during its POST); a second task for it waits.
    lease_until       timestamptz,
    next_attempt_time timestamptz,
    last_attempt_time timestamptz,
    last_status_code  integer,
    last_error        text,
    create_time       timestamptz NOT NULL DEFAULT now(),
    update_time       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_deliveries_event_endpoint_key UNIQUE (event_id, endpoint_id)
);
-- ListWebhookDeliveries: an endpoint's newest first (UUIDv7 = time order).
CREATE INDEX webhook_deliveries_endpoint_idx ON webhook_deliveries (endpoint_id, id DESC);
-- RecoverWebhookDeliveries: an endpoint's failed deliveries since T.
CREATE INDEX webhook_deliveries_failed_idx ON webhook_deliveries (endpoint_id, create_time)
    WHERE status = 'failed';

-- Every attempt, written by the batching writer (like the request log). Bounded: response
-- headers and body are cut to 20 KiB by the worker.
CREATE TABLE webhook_attempts (
    delivery_id     uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt         integer NOT NULL CHECK (attempt >= 1),
    tenant_id       uuid NOT NULL,
    endpoint_id     uuid NOT NULL,
    attempt_time    timestamptz NOT NULL,
    url             text NOT NULL,
    status_code     integer,
    response_headers jsonb NOT NULL DEFAULT '{}',
    response_body   text NOT NULL DEFAULT '',
    latency_ms      integer NOT NULL CHECK (latency_ms >= 0),
    -- NULL on success; otherwise what went wrong.
    error_kind      text CHECK (error_kind IN
        ('timeout', 'connect', 'tls', 'dns', 'refused_by_ssrf_guard', 'status', 'other')),
    error_message   text,
    -- Whether a retry, a manual retry or recover caused it.
    trigger         text NOT NULL DEFAULT 'scheduled' CHECK (trigger IN ('scheduled', 'manual')),
    -- A crash after the POST but before the delivery row was updated repeats an attempt
    -- number; the writer keeps the first.
    PRIMARY KEY (delivery_id, attempt)
);

-- The fan-out caches each tenant's endpoints; a change wakes it to forget that tenant.
CREATE FUNCTION webhook_endpoints_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('devgate_webhook_endpoints',
                      CASE WHEN TG_OP = 'DELETE' THEN OLD.tenant_id ELSE NEW.tenant_id END::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER webhook_endpoints_notify AFTER INSERT OR UPDATE OR DELETE ON webhook_endpoints
    FOR EACH ROW EXECUTE FUNCTION webhook_endpoints_notify();
