-- Idempotency records shared by every replica: the first execution of an
-- (API key, Idempotency-Key) claims it; later ones wait, replay the kept
-- answer, or are refused when the body differs.
--
-- KEYS[1]: the record (hash: hash, state running|done, record).
-- ARGV: op, then for claim: body hash, how long a claim lives (ms; a
-- replica that dies mid-request must not block the key for ever).
local op = ARGV[1]
if op == 'claim' then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('HSET', KEYS[1], 'hash', ARGV[2], 'state', 'running')
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {'execute'}
  end
  local v = redis.call('HMGET', KEYS[1], 'hash', 'state', 'record')
  if v[1] ~= ARGV[2] then return {'mismatch'} end
  if v[2] == 'running' then return {'running'} end
  return {'done', v[3]}
elseif op == 'keep' then
  -- ARGV: op, body hash, record, ttl ms.
  redis.call('HSET', KEYS[1], 'hash', ARGV[2], 'state', 'done', 'record', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return 1
elseif op == 'release' then
  -- ARGV: op, body hash. Only a claim still running, and only ours.
  local v = redis.call('HMGET', KEYS[1], 'hash', 'state')
  if v[1] == ARGV[2] and v[2] == 'running' then redis.call('DEL', KEYS[1]) end
  return 1
end
return redis.error_reply('unknown idempotency operation ' .. tostring(op))
