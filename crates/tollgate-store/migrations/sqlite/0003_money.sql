-- Money: prepaid accounts and the entries behind their balances, budgets,
-- holds of in-flight requests, and the usage ledger. Amounts are integer
-- micro-USD; times are Unix milliseconds.
ALTER TABLE api_keys ADD COLUMN account TEXT;

CREATE TABLE accounts (
    name               TEXT PRIMARY KEY,
    balance_micros     INTEGER NOT NULL DEFAULT 0,
    low_balance_micros INTEGER,
    created_at         INTEGER NOT NULL
);

-- Top-ups and adjustments; the balance is their sum minus settled usage.
CREATE TABLE credit_entries (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    account       TEXT NOT NULL REFERENCES accounts (name),
    amount_micros INTEGER NOT NULL,
    who           TEXT NOT NULL,
    why           TEXT NOT NULL,
    at            INTEGER NOT NULL
);
CREATE INDEX credit_entries_account ON credit_entries (account, id);

-- Spend caps: scope is `org`, `team:T`, `key:NAME`, `user:ID` or `user:*`
-- (each end user on their own).
CREATE TABLE budgets (
    scope         TEXT NOT NULL,
    period        TEXT NOT NULL,
    cap_micros    INTEGER NOT NULL,
    alert_percent INTEGER,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (scope, period)
);

-- Credit held for requests in flight. Written and cleared by the ledger's
-- batches; whatever a crash leaves here is released at the next start.
CREATE TABLE holds (
    request_id    TEXT PRIMARY KEY,
    account       TEXT NOT NULL,
    amount_micros INTEGER NOT NULL,
    at            INTEGER NOT NULL
);

-- One row per served request.
CREATE TABLE usage (
    id            INTEGER PRIMARY KEY,
    request_id    TEXT NOT NULL,
    at            INTEGER NOT NULL,
    key_id        TEXT,
    key_name      TEXT,
    end_user      TEXT,
    team          TEXT,
    account       TEXT,
    model         TEXT NOT NULL,
    served_model  TEXT,
    deployment    TEXT,
    input_tokens  INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_micros   INTEGER NOT NULL,
    status        INTEGER NOT NULL,
    latency_ms    INTEGER NOT NULL,
    streamed      INTEGER NOT NULL
);
CREATE INDEX usage_at ON usage (at);
