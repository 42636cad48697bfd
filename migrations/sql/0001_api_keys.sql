-- Revision 0001: API keys, stored only as HMACs.
CREATE TABLE api_keys (
    key_id      text PRIMARY KEY CHECK (key_id ~ '^[a-z0-9]{8,32}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    -- HMAC-SHA256 of the whole key under PAYSAGA_API_KEY_SECRET; the key itself
    -- is shown once, at creation, and never stored.
    key_hash    bytea NOT NULL CHECK (length(key_hash) = 32),
    scopes      text[] NOT NULL CHECK (cardinality(scopes) >= 1),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
