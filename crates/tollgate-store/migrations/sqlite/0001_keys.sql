-- Virtual API keys. Only the SHA-256 of a secret is stored; `prefix` is the
-- first characters of the secret, kept so people can tell keys apart.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    models      TEXT,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked_at  INTEGER,
    updated_at  INTEGER NOT NULL
);

-- A name may be reused once the key that held it is revoked.
CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL;
