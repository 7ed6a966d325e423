-- Cached input tokens in the rollups too, so that usage reports over whole
-- minutes and hours read the rollups and sum rows only at a window's edges.
ALTER TABLE usage_minutes ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_hours ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0;

-- The rollups are written with the rows, so the rows give their cached sums.
UPDATE usage_minutes SET cached_tokens = c.cached
FROM (SELECT at - at % 60000 AS bucket, COALESCE(key_name, '-') AS k, COALESCE(team, '-') AS t,
             model AS m, SUM(cached_tokens) AS cached
      FROM usage WHERE cached_tokens > 0 GROUP BY 1, 2, 3, 4) AS c
WHERE usage_minutes.at = c.bucket AND usage_minutes.key_name = c.k
  AND usage_minutes.team = c.t AND usage_minutes.model = c.m;

UPDATE usage_hours SET cached_tokens = c.cached
FROM (SELECT at - at % 3600000 AS bucket, COALESCE(key_name, '-') AS k, COALESCE(team, '-') AS t,
             model AS m, SUM(cached_tokens) AS cached
      FROM usage WHERE cached_tokens > 0 GROUP BY 1, 2, 3, 4) AS c
WHERE usage_hours.at = c.bucket AND usage_hours.key_name = c.k
  AND usage_hours.team = c.t AND usage_hours.model = c.m;
