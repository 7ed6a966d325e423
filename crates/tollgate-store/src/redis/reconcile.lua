-- Corrects the token charge of a request admitted at ARGV[2] (µs, Redis's
-- clock) by ARGV[1] tokens (real minus estimated; negative refunds), on
-- every token limit of every subject: tollgate_core::limits::reconcile.
--
-- KEYS: the subjects' hashes, as for admit.lua.
-- ARGV: delta, admitted_at_us, then per subject tpm, tpd (-1 for none).

local MINUTE = 60000000
local DAY = 86400000000
local delta = tonumber(ARGV[1])
local at = tonumber(ARGV[2])
local day = math.floor(at / DAY)
if delta == 0 then return 0 end

local function interval(amount)
  return math.max(1, math.ceil(MINUTE / amount))
end

for i = 1, #KEYS do
  local tpm = tonumber(ARGV[2 + (i - 1) * 2 + 1])
  local tpd = tonumber(ARGV[2 + (i - 1) * 2 + 2])
  local v = redis.call('HMGET', KEYS[i], 't1', 'r1', 'd', 'u1')
  local tat, rate, d, used = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0
  if tpm > 0 then
    if rate ~= 0 and rate ~= tpm and tat > at then
      tat = at + math.ceil((tat - at) / interval(rate)) * interval(tpm)
    end
    local shift = math.abs(delta) * interval(tpm)
    if delta > 0 then
      -- A state expired meanwhile reads 0: the extra tokens were spent at
      -- admission, so that is where they are charged.
      tat = math.max(tat, at) + shift
    else
      tat = math.max(0, tat - shift)
    end
    redis.call('HSET', KEYS[i], 't1', tat, 'r1', tpm)
  end
  if tpd >= 0 and d == day then
    used = math.max(0, used + delta)
    redis.call('HSET', KEYS[i], 'u1', used)
  end
  local ttl = redis.call('PTTL', KEYS[i])
  local keep = math.floor(math.max(tat - at, 0) / 1000) + 1000
  if ttl < keep then redis.call('PEXPIRE', KEYS[i], keep) end
end
return 1
