-- Tenants: created on first authenticated use by one of their users.
CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    name        text NOT NULL DEFAULT '',
    plan        text NOT NULL DEFAULT 'free'
                CHECK (plan IN ('free', 'standard', 'professional', 'business', 'enterprise')),
    create_time timestamptz NOT NULL DEFAULT now()
);

-- API keys. The id is the public 12-character key id embedded in the token; the secret is
-- stored only as an argon2id PHC hash. A rotated-out secret keeps a hash until its grace
-- period ends.
CREATE TABLE api_keys (
    id                          text PRIMARY KEY CHECK (id ~ '^[0-9A-Za-z]{12}$'),
    tenant_id                   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name                        text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    description                 text NOT NULL DEFAULT '' CHECK (char_length(description) <= 1000),
    environment                 text NOT NULL CHECK (environment IN ('live', 'test')),
    scopes                      text[] NOT NULL CHECK (array_position(scopes, NULL) IS NULL),
    allowed_cidrs               cidr[] NOT NULL DEFAULT '{}' CHECK (array_position(allowed_cidrs, NULL) IS NULL),
    secret_hash                 text NOT NULL,
    previous_secret_hash        text,
    previous_secret_expire_time timestamptz,
    created_by                  text NOT NULL,
    create_time                 timestamptz NOT NULL DEFAULT now(),
    update_time                 timestamptz NOT NULL DEFAULT now(),
    last_used_time              timestamptz,
    expire_time                 timestamptz,
    revoke_time                 timestamptz,
    revoke_reason               text,
    CHECK ((previous_secret_hash IS NULL) = (previous_secret_expire_time IS NULL))
);

-- Listing: a tenant's keys newest first, keyset-paginated on (create_time, id).
CREATE INDEX api_keys_tenant_listing ON api_keys (tenant_id, create_time DESC, id DESC);
