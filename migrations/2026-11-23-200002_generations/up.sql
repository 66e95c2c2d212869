-- The outbox also carries ready-made messages for other exchanges (the generation proxy's
-- jobs and cancels for the AI orchestrator), committed with the change that causes them and
-- published by the same relay: a row holds either an event or a message.
ALTER TABLE outbox
    ALTER COLUMN event_id DROP NOT NULL,
    ADD COLUMN exchange     text,
    ADD COLUMN routing_key  text,
    ADD COLUMN body         bytea,
    ADD COLUMN content_type text,
    ADD COLUMN message_type text,
    ADD COLUMN message_id   text,
    ADD CONSTRAINT outbox_event_or_message CHECK ((event_id IS NULL) <> (body IS NULL)),
    ADD CONSTRAINT outbox_message_addressed CHECK (
        body IS NULL OR (exchange IS NOT NULL AND routing_key IS NOT NULL
                         AND message_id IS NOT NULL AND content_type IS NOT NULL));

-- Generations: one row per CreateGeneration, charged in the transaction that inserts it.
CREATE TABLE generations (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    kind           text NOT NULL CHECK (char_length(kind) BETWEEN 1 AND 50),
    prompt         text NOT NULL CHECK (char_length(prompt) BETWEEN 1 AND 4000),
    output_format  text NOT NULL CHECK (char_length(output_format) BETWEEN 1 AND 20),
    style          jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(style) = 'object'),
    count          integer NOT NULL CHECK (count BETWEEN 1 AND 8),
    project_id     text NOT NULL DEFAULT '' CHECK (char_length(project_id) <= 200),
    metadata       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    state          text NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    progress       integer NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    -- Credits charged (price × count); refunded once when it fails or is cancelled.
    cost           bigint NOT NULL CHECK (cost >= 0),
    refunded       boolean NOT NULL DEFAULT false,
    asset_ids      text[] NOT NULL DEFAULT '{}',
    result_urls    text[] NOT NULL DEFAULT '{}',
    error_code     text,
    error_message  text,
    -- The orchestrator's last applied update (updates are applied only in sequence order).
    last_sequence  bigint NOT NULL DEFAULT 0,
    -- `api_key:<id>` or `user:<id>`.
    created_by     text NOT NULL CHECK (char_length(created_by) BETWEEN 1 AND 200),
    create_time    timestamptz NOT NULL DEFAULT now(),
    start_time     timestamptz,
    end_time       timestamptz,
    update_time    timestamptz NOT NULL DEFAULT now()
);
-- ListGenerations: newest first (UUIDv7), optionally by state or project.
CREATE INDEX generations_tenant_idx ON generations (tenant_id, id DESC);
CREATE INDEX generations_project_idx ON generations (tenant_id, project_id, id DESC);
-- The timeout sweep: generations not yet terminal, oldest first.
CREATE INDEX generations_open_idx ON generations (create_time)
    WHERE state IN ('queued', 'running');
