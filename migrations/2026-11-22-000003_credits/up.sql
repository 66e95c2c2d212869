-- Credits: one balance row per tenant and an append-only ledger of every change to it.
-- Both are written in the same transaction; the balance row's lock serialises the writers
-- of one tenant, and the CHECKs keep the balance from ever going negative.
CREATE TABLE credit_balances (
    tenant_id   uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    balance     bigint NOT NULL DEFAULT 0 CHECK (balance >= 0),
    update_time timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE credit_ledger (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- Positive: grant or refund; negative: deduction.
    amount         bigint NOT NULL CHECK (amount <> 0),
    reason         text NOT NULL CHECK (char_length(reason) BETWEEN 1 AND 200),
    reference      text NOT NULL DEFAULT '' CHECK (char_length(reference) <= 200),
    -- The caller's retry key: one entry per (tenant, id). NULLs (no key) may repeat.
    idempotency_id text CHECK (char_length(idempotency_id) BETWEEN 1 AND 200),
    balance_after  bigint NOT NULL CHECK (balance_after >= 0),
    create_time    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT credit_ledger_tenant_idempotency UNIQUE (tenant_id, idempotency_id)
);

-- Listing: a tenant's entries newest first, keyset-paginated on (create_time, id).
CREATE INDEX credit_ledger_tenant_listing ON credit_ledger (tenant_id, create_time DESC, id DESC);

-- The ledger is append-only: it is the audit trail the balance is explained by, so an
-- UPDATE or DELETE of an entry raises. The one exception is the ON DELETE CASCADE of a
-- deleted tenant (its tenant row is already gone when the cascade reaches the ledger).
CREATE FUNCTION credit_ledger_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND NOT EXISTS (SELECT 1 FROM tenants WHERE id = OLD.tenant_id) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'credit_ledger is append-only: % of entry % refused', TG_OP, OLD.id
        USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER credit_ledger_append_only
    BEFORE UPDATE OR DELETE ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION credit_ledger_append_only();
