-- API keys: a bearer token names its key (id) and proves it holds the secret; only the secret's
-- SHA-256 is stored. Secrets are 256 random bits, so a plain hash is enough: there is nothing to
-- guess, and a stolen table reveals no usable key.
CREATE TABLE api_keys (
    id             text PRIMARY KEY,
    tenant_id      text NOT NULL REFERENCES tenants (id),
    name           text NOT NULL DEFAULT '',
    secret_sha256  bytea NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- A revoked key is refused from the next call on: every call looks its key up.
    revoked_at     timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
