-- Webhook endpoints: where a tenant's events are delivered. Ids are UUIDv7 (made by devgate),
-- so they sort by creation time and listing pages on the id alone. Signing secrets are stored
-- only encrypted (`v1:<key id>:<base64>`, AES-256-GCM bound to tenant and endpoint).
CREATE TABLE webhook_endpoints (
    id                          uuid PRIMARY KEY,
    tenant_id                   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url                         text NOT NULL CHECK (char_length(url) BETWEEN 1 AND 2048),
    description                 text NOT NULL DEFAULT '' CHECK (char_length(description) <= 1000),
    event_types                 text[] NOT NULL
        CHECK (cardinality(event_types) BETWEEN 1 AND 100 AND array_position(event_types, NULL) IS NULL),
    headers                     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(headers) = 'object'),
    rate_limit_per_second       integer NOT NULL DEFAULT 0 CHECK (rate_limit_per_second BETWEEN 0 AND 1000),
    secret_ciphertext           text NOT NULL,
    previous_secret_ciphertext  text,
    previous_secret_expire_time timestamptz,
    disabled_time               timestamptz,
    disabled_reason             text CHECK (disabled_reason IN ('consecutive_failures', 'gone', 'manual')),
    consecutive_failures        integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    created_by                  text NOT NULL CHECK (char_length(created_by) BETWEEN 1 AND 200),
    create_time                 timestamptz NOT NULL DEFAULT now(),
    update_time                 timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_endpoints_previous_secret_check
        CHECK ((previous_secret_ciphertext IS NULL) = (previous_secret_expire_time IS NULL)),
    CONSTRAINT webhook_endpoints_disabled_check
        CHECK ((disabled_time IS NULL) = (disabled_reason IS NULL))
);

-- ListWebhookEndpoints: a tenant's newest first, keyset-paged on id (UUIDv7 = time order).
CREATE INDEX webhook_endpoints_tenant_idx ON webhook_endpoints (tenant_id, id DESC);
-- Fan-out: the tenant's enabled endpoints.
CREATE INDEX webhook_endpoints_enabled_idx ON webhook_endpoints (tenant_id)
    WHERE disabled_time IS NULL;
