-- 0003: API keys. A key maps a caller to one project; only a salted hash of its secret is kept.
-- Keys are never deleted, only revoked, so "has any key ever been made" (which turns
-- authentication on) can never become false again by accident.

CREATE TABLE api_keys (
    key_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id bigint NOT NULL REFERENCES projects,
    -- The public part of the key (msk_<12 hex>): how a key is found, listed and revoked.
    prefix text NOT NULL UNIQUE,
    -- HMAC-SHA256(salt, secret); the secret itself is shown once and never stored.
    salt bytea NOT NULL,
    digest bytea NOT NULL,
    label text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    revoked_at timestamptz
);
CREATE INDEX api_keys_project ON api_keys (project_id);
