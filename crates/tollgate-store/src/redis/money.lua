-- Budgets' windowed spend and accounts' funds, shared by every replica.
-- One script, several operations (ARGV[1]); every reply is a list of
-- integers. A missing hash is unknown, never zero: the gateway seeds it
-- from the database (which is the truth when Redis has lost its state) and
-- retries. `last_entry` in an account is the newest credit entry already
-- in its balance.

-- (Starts after reserve.lua.)
local op = ARGV[1]

local function num(key, field)
  return tonumber(redis.call('HGET', key, field) or '0')
end

if op == 'reserve' then
  -- KEYS: budget hashes, then the account's. ARGV: op, then a money charge
  -- (see money_args).
  local m = money_args(1, 2)
  local refusal, left = money_check(m)
  if refusal then return refusal end
  money_apply(m)
  local reply = money_left(left)
  table.insert(reply, 1, 0)
  return reply

elseif op == 'settle' then
  -- KEYS as for reserve. ARGV: op, reserved, actual, has_account, then per
  -- budget: cap, window start, ttl ms, alert percent (-1: none).
  -- A hash that is gone (Redis lost it) is skipped: its seed, summed from
  -- the ledger, will count this request's row.
  local reserved, actual = tonumber(ARGV[2]), tonumber(ARGV[3])
  local has_account = ARGV[4] == '1'
  local nb = #KEYS - (has_account and 1 or 0)
  local left = nil
  local alerts = {}
  for i = 1, nb do
    local k = KEYS[i]
    local v = redis.call('HMGET', k, 'start', 'spent', 'reserved', 'alerted')
    if v[1] then
      local base = 4 + (i - 1) * 4
      local cap, start = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
      local pct = tonumber(ARGV[base + 4])
      local spent, alerted = tonumber(v[2]) or 0, tonumber(v[4]) or 0
      if start > tonumber(v[1]) then spent, alerted = 0, 0 end
      local r = math.max(0, (tonumber(v[3]) or 0) - reserved)
      spent = spent + actual
      local l = cap - spent - r
      if left == nil or l < left then left = l end
      if pct >= 0 and alerted == 0 and spent * 100 >= cap * pct then
        alerted = 1
        alerts[#alerts + 1] = i
        alerts[#alerts + 1] = spent
      end
      redis.call('HSET', k, 'start', math.max(start, tonumber(v[1])), 'reserved', r,
                 'spent', spent, 'alerted', alerted)
      redis.call('PEXPIRE', k, ARGV[base + 3])
    end
  end
  local credits, low_alert, balance, low_mark = nil, 0, 0, 0
  local a = KEYS[#KEYS]
  local f = has_account and redis.call('HMGET', a, 'balance', 'held', 'low', 'low_alerted')
  if f and f[1] then
    local held = math.max(0, (tonumber(f[2]) or 0) - reserved)
    balance = tonumber(f[1]) - actual
    credits = balance - held
    redis.call('HSET', a, 'held', held, 'balance', balance)
    local low = tonumber(f[3])
    if low and balance < low and (tonumber(f[4]) or 0) == 0 then
      redis.call('HSET', a, 'low_alerted', 1)
      low_alert, low_mark = 1, low
    end
  end
  local reply = {left and 1 or 0, left or 0, credits and 1 or 0, credits or 0, low_alert, balance, low_mark}
  for _, v in ipairs(alerts) do reply[#reply + 1] = v end
  return reply

elseif op == 'seed_budget' then
  -- ARGV: op, window start, spent, ttl ms. Only where nothing is known:
  -- a replica that starts late must not overwrite live counts.
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  redis.call('HSET', KEYS[1], 'start', ARGV[2], 'spent', ARGV[3], 'reserved', 0, 'alerted', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return 1

elseif op == 'seed_account' then
  -- ARGV: op, balance, low (-1: none), last entry.
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  local balance, low = tonumber(ARGV[2]), tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'balance', balance, 'held', 0, 'last_entry', ARGV[4],
    'low_alerted', (low >= 0 and balance < low) and 1 or 0)
  if low >= 0 then redis.call('HSET', KEYS[1], 'low', low) end
  redis.call('PEXPIRE', KEYS[1], ACCOUNT_TTL_MS)
  return 1

elseif op == 'credit' then
  -- ARGV: op, entry id, amount. Each entry counts once, whichever replica
  -- saw it first; an unknown account will be seeded with it included.
  local a = KEYS[1]
  if redis.call('EXISTS', a) == 0 then return 0 end
  local id = tonumber(ARGV[2])
  if id <= num(a, 'last_entry') then return 0 end
  local balance = num(a, 'balance') + tonumber(ARGV[3])
  redis.call('HSET', a, 'balance', balance, 'last_entry', id)
  local low = redis.call('HGET', a, 'low')
  if not low or balance >= tonumber(low) then redis.call('HSET', a, 'low_alerted', 0) end
  return 1

elseif op == 'set_low' then
  -- ARGV: op, low (-1: none).
  local a = KEYS[1]
  if redis.call('EXISTS', a) == 0 then return 0 end
  if tonumber(ARGV[2]) < 0 then redis.call('HDEL', a, 'low')
  else redis.call('HSET', a, 'low', ARGV[2]) end
  return 1

elseif op == 'read' then
  -- Per key: exists, then spent/reserved (a budget, as of the window
  -- starting at ARGV[2]) or balance/held (an account).
  local reply = {}
  for i = 1, #KEYS do
    local k = KEYS[i]
    if redis.call('EXISTS', k) == 0 then
      reply[#reply + 1] = 0; reply[#reply + 1] = 0; reply[#reply + 1] = 0
    elseif redis.call('HEXISTS', k, 'balance') == 1 then
      reply[#reply + 1] = 1; reply[#reply + 1] = num(k, 'balance'); reply[#reply + 1] = num(k, 'held')
    else
      local spent = num(k, 'spent')
      if tonumber(ARGV[2]) > num(k, 'start') then spent = 0 end
      reply[#reply + 1] = 1; reply[#reply + 1] = spent; reply[#reply + 1] = num(k, 'reserved')
    end
  end
  return reply
end
return redis.error_reply('unknown money operation ' .. tostring(op))
