-- Idempotency-Key (Stripe's semantics) for every create RPC: one row per (tenant, key), kept
-- 24 h. A request reserves its key `in_flight` under a lease in a short transaction of its
-- own; the RPC's transaction flips the row to `completed` together with its work, so the
-- record exists only if the work committed. A failed attempt deletes its reservation; a
-- crashed one leaves a lease that a retry takes over once it has expired.
-- No foreign key to tenants: the key is reserved before the RPC creates the tenant row.
CREATE TABLE idempotency_keys (
    tenant_id    uuid NOT NULL,
    key          text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    -- The full method name (`devgate.v1.WebhookService/CreateWebhookEndpoint`).
    rpc          text NOT NULL,
    -- SHA-256 of the RPC name and the encoded request message.
    request_hash bytea NOT NULL CHECK (length(request_hash) = 32),
    state        text NOT NULL CHECK (state IN ('in_flight', 'completed')),
    -- Which attempt holds the reservation: only that attempt may complete or release it,
    -- so a slow attempt whose lease was taken over cannot complete it as well.
    lease_id     uuid NOT NULL,
    lease_until  timestamptz,
    -- The encoded response proto; NULL for RPCs whose response holds a secret (a replay
    -- of those answers ALREADY_EXISTS naming `resource_id`).
    response     bytea,
    resource_id  text,
    create_time  timestamptz NOT NULL,
    expire_time  timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, key),
    CHECK ((state = 'in_flight') = (lease_until IS NOT NULL)),
    CHECK (state = 'in_flight' OR resource_id IS NOT NULL)
);
-- The worker's sweep of expired keys.
CREATE INDEX idempotency_keys_expire_idx ON idempotency_keys (expire_time);
