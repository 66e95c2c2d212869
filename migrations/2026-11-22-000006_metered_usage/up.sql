-- Metered usage recorded by other services (RecordUsage), e.g. generation seconds. The
-- idempotency id makes a retried record count once.
CREATE TABLE metered_usage (
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    idempotency_id text NOT NULL CHECK (char_length(idempotency_id) BETWEEN 1 AND 200),
    api_key_id     text,
    metric         text NOT NULL CHECK (metric ~ '^[a-z][a-z0-9_]{0,62}$'),
    quantity       bigint NOT NULL CHECK (quantity > 0),
    time           timestamptz NOT NULL,
    create_time    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, idempotency_id)
);
CREATE INDEX metered_usage_by_time ON metered_usage (tenant_id, time);
