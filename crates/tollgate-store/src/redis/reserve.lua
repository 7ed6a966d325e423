-- Reserving money: shared by the money script and the admission script,
-- each of which starts with this file. A budget is a hash (start, spent,
-- reserved, alerted); an account a hash (balance, held, low, low_alerted,
-- last_entry). Amounts are integer micro-USD (exact in Lua's doubles up to
-- 2^53, some $9 billion).

-- An idle account is forgotten after 30 days (and seeded again if used).
local ACCOUNT_TTL_MS = 2592000000

-- A money charge from KEYS from k0 on and ARGV from a0 on: amount,
-- has_account, budget count, then per budget cap, window start, ttl ms;
-- the keys are the budgets', then the account's.
local function money_args(k0, a0)
  local nb = tonumber(ARGV[a0 + 2])
  local m = { amount = tonumber(ARGV[a0]), budgets = {} }
  for i = 1, nb do
    local base = a0 + 3 + (i - 1) * 3
    m.budgets[i] = { key = KEYS[k0 + i - 1], cap = tonumber(ARGV[base]),
                     start = tonumber(ARGV[base + 1]), ttl = ARGV[base + 2] }
  end
  if ARGV[a0 + 1] == '1' then m.account = KEYS[k0 + nb] end
  return m
end

-- Checks a charge without reserving it. Returns a refusal, or nil and
-- what would be left {budget, credits} (each nil when not charged):
--   {1, i...}          counts Redis does not hold (the caller seeds them)
--   {2, i, committed}  budget i cannot take it
--   {3, balance, held} the account cannot cover it
local function money_check(m)
  local missing = { 1 }
  -- One read per hash; a budget always has `start`, an account `balance`.
  for i, b in ipairs(m.budgets) do
    b.state = redis.call('HMGET', b.key, 'start', 'spent', 'reserved')
    if not b.state[1] then missing[#missing + 1] = i end
  end
  local funds = m.account and redis.call('HMGET', m.account, 'balance', 'held')
  if funds and not funds[1] then missing[#missing + 1] = #m.budgets + 1 end
  if #missing > 1 then return missing end
  local left = nil
  for i, b in ipairs(m.budgets) do
    local spent = tonumber(b.state[2]) or 0
    if b.start > tonumber(b.state[1]) then
      -- A new window: its count starts at zero (reservations in flight stay).
      redis.call('HSET', b.key, 'start', b.start, 'spent', 0, 'alerted', 0)
      spent = 0
    end
    local committed = spent + (tonumber(b.state[3]) or 0)
    if committed + m.amount > b.cap then return { 2, i, committed } end
    local l = b.cap - committed - m.amount
    if left == nil or l < left then left = l end
  end
  local credits = nil
  if funds then
    local balance, held = tonumber(funds[1]), tonumber(funds[2]) or 0
    if balance - held < m.amount then return { 3, balance, held } end
    credits = balance - held - m.amount
  end
  return nil, { left, credits }
end

-- Reserves a checked charge everywhere at once.
local function money_apply(m)
  for _, b in ipairs(m.budgets) do
    redis.call('HINCRBY', b.key, 'reserved', m.amount)
    redis.call('PEXPIRE', b.key, b.ttl)
  end
  if m.account then
    redis.call('HINCRBY', m.account, 'held', m.amount)
    redis.call('PEXPIRE', m.account, ACCOUNT_TTL_MS)
  end
end

-- {has budget, budget left, has credits, credits left}
local function money_left(left)
  return { left[1] and 1 or 0, left[1] or 0, left[2] and 1 or 0, left[2] or 0 }
end

