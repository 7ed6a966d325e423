-- The whole schema as of the SQLite migrations 0001-0004, for PostgreSQL.
-- Amounts are integer micro-USD and times Unix milliseconds (seconds for
-- a key's created/expires/revoked), all BIGINT so they decode as i64.

-- Virtual API keys. Only the SHA-256 of a secret is stored.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    models      TEXT,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    revoked_at  BIGINT,
    updated_at  BIGINT NOT NULL,
    preset      TEXT,
    team        TEXT,
    limits      TEXT NOT NULL DEFAULT '{}',
    account     TEXT
);
-- A name may be reused once the key that held it is revoked.
CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL;

CREATE TABLE accounts (
    name               TEXT PRIMARY KEY,
    balance_micros     BIGINT NOT NULL DEFAULT 0,
    low_balance_micros BIGINT,
    created_at         BIGINT NOT NULL
);

-- Top-ups and adjustments; the balance is their sum minus settled usage.
CREATE TABLE credit_entries (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account       TEXT NOT NULL REFERENCES accounts (name),
    amount_micros BIGINT NOT NULL,
    who           TEXT NOT NULL,
    why           TEXT NOT NULL,
    at            BIGINT NOT NULL
);
CREATE INDEX credit_entries_account ON credit_entries (account, id);

-- Spend caps: scope is `org`, `team:T`, `key:NAME`, `user:ID` or `user:*`.
CREATE TABLE budgets (
    scope         TEXT NOT NULL,
    period        TEXT NOT NULL,
    cap_micros    BIGINT NOT NULL,
    alert_percent BIGINT,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (scope, period)
);

-- Credit held for requests in flight; what a crash leaves is released at
-- the next start.
CREATE TABLE holds (
    request_id    TEXT PRIMARY KEY,
    account       TEXT NOT NULL,
    amount_micros BIGINT NOT NULL,
    at            BIGINT NOT NULL
);

-- One row per served request.
CREATE TABLE usage (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id    TEXT NOT NULL,
    at            BIGINT NOT NULL,
    key_id        TEXT,
    key_name      TEXT,
    end_user      TEXT,
    team          TEXT,
    account       TEXT,
    model         TEXT NOT NULL,
    served_model  TEXT,
    deployment    TEXT,
    input_tokens  BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cost_micros   BIGINT NOT NULL,
    status        BIGINT NOT NULL,
    latency_ms    BIGINT NOT NULL,
    streamed      BOOLEAN NOT NULL
);
CREATE INDEX usage_at ON usage (at);

-- Usage summed per minute and per hour by key, team and model.
CREATE TABLE usage_minutes (
    at            BIGINT NOT NULL,
    key_name      TEXT   NOT NULL,
    team          TEXT   NOT NULL,
    model         TEXT   NOT NULL,
    requests      BIGINT NOT NULL,
    input_tokens  BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cost_micros   BIGINT NOT NULL,
    PRIMARY KEY (at, key_name, team, model)
);

CREATE TABLE usage_hours (LIKE usage_minutes INCLUDING ALL);
