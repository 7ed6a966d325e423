-- Usage summed per minute and per hour by key, team and model, kept by the
-- ledger writer in the same transaction as the rows: the dashboard reads
-- these instead of scanning every usage row on each refresh.
CREATE TABLE usage_minutes (
    at            INTEGER NOT NULL,  -- bucket start, Unix ms
    key_name      TEXT    NOT NULL,  -- '-' when none
    team          TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    requests      INTEGER NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_micros   INTEGER NOT NULL,
    PRIMARY KEY (at, key_name, team, model)
) WITHOUT ROWID;

CREATE TABLE usage_hours (
    at            INTEGER NOT NULL,
    key_name      TEXT    NOT NULL,
    team          TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    requests      INTEGER NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_micros   INTEGER NOT NULL,
    PRIMARY KEY (at, key_name, team, model)
) WITHOUT ROWID;

INSERT INTO usage_minutes
SELECT at - at % 60000, COALESCE(key_name, '-'), COALESCE(team, '-'), model,
       COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost_micros)
FROM usage GROUP BY 1, 2, 3, 4;

INSERT INTO usage_hours
SELECT at - at % 3600000, COALESCE(key_name, '-'), COALESCE(team, '-'), model,
       COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost_micros)
FROM usage GROUP BY 1, 2, 3, 4;
