-- Limits on keys: a preset to start from, a team to share limits with, and
-- the key's own settings as JSON (rpm, tpm, rpd, tpd, models, users, max_wait).
ALTER TABLE api_keys ADD COLUMN preset TEXT;
ALTER TABLE api_keys ADD COLUMN team TEXT;
ALTER TABLE api_keys ADD COLUMN limits TEXT NOT NULL DEFAULT '{}';
