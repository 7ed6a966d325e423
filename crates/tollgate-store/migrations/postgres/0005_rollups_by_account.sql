-- The rollups kept by account too, and with cached input tokens, so that
-- usage reports by key, team, account, model or day read whole minutes and
-- hours from them and sum rows only at a window's edges. They are written
-- with the rows, so they are rebuilt from the rows.
DROP TABLE usage_minutes;
DROP TABLE usage_hours;

CREATE TABLE usage_minutes (
    at            BIGINT  NOT NULL,  -- bucket start, Unix ms
    key_name      TEXT    NOT NULL,  -- '-' when none
    team          TEXT    NOT NULL,
    account       TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    requests      BIGINT  NOT NULL,
    input_tokens  BIGINT  NOT NULL,
    cached_tokens BIGINT  NOT NULL,
    output_tokens BIGINT  NOT NULL,
    cost_micros   BIGINT  NOT NULL,
    PRIMARY KEY (at, key_name, team, account, model)
);

CREATE TABLE usage_hours (LIKE usage_minutes INCLUDING ALL);

INSERT INTO usage_minutes
SELECT at - at % 60000, COALESCE(key_name, '-'), COALESCE(team, '-'), COALESCE(account, '-'), model,
       COUNT(*), SUM(input_tokens), SUM(cached_tokens), SUM(output_tokens), SUM(cost_micros)
FROM usage GROUP BY 1, 2, 3, 4, 5;

INSERT INTO usage_hours
SELECT at - at % 3600000, COALESCE(key_name, '-'), COALESCE(team, '-'), COALESCE(account, '-'), model,
       COUNT(*), SUM(input_tokens), SUM(cached_tokens), SUM(output_tokens), SUM(cost_micros)
FROM usage GROUP BY 1, 2, 3, 4, 5;
