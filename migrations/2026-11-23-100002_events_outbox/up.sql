-- The event log: every event a tenant can receive, from internal services (PublishEvent,
-- `service:<caller>`) or from devgate itself (`devgate`). Ids are UUIDv7 (made by devgate),
-- so they sort by creation time. `event_type` has no foreign key yet: the catalog is a
-- separate migration.
CREATE TABLE events (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    event_type     text NOT NULL CHECK (char_length(event_type) BETWEEN 1 AND 200),
    payload        jsonb NOT NULL,
    -- The publisher's key: a repeat with the same key returns the first event. NULLs never
    -- conflict, so events without a key are never deduplicated.
    idempotency_id text CHECK (char_length(idempotency_id) BETWEEN 1 AND 200),
    source         text NOT NULL CHECK (char_length(source) BETWEEN 1 AND 200),
    create_time    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_tenant_idempotency_key UNIQUE (tenant_id, idempotency_id)
);

-- ListEvents: a tenant's newest first, keyset-paged on (create_time, id).
CREATE INDEX events_tenant_time_idx ON events (tenant_id, create_time DESC, id DESC);

-- Events committed but not yet confirmed by RabbitMQ. The relay claims rows with
-- FOR UPDATE SKIP LOCKED and deletes them once the broker confirmed the publish.
CREATE TABLE outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    create_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_event_idx ON outbox (event_id);

-- Wakes the relays when a transaction that wrote outbox rows commits (NOTIFY is
-- transactional: a rollback notifies nobody). Once per statement, and Postgres folds
-- identical notifications of one transaction into one. The channel name is fixed: every
-- deployment (and every test) has its own database, and notifications never cross databases.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('devgate_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
