-- One admission decision over every limit of every subject of a request,
-- atomically, on Redis's own clock: the same decision as
-- tollgate_core::limits::admit, in microseconds (Redis's TIME resolution,
-- and exact in Lua's doubles; a refill interval rounds up to 1 µs, so a
-- limit is never exceeded).
--
-- (Starts after reserve.lua.) With a money charge, the request's budgets
-- and account are checked first, in the same call: a spent budget is
-- final, so it is the answer even when a rate limit would also refuse; and
-- money is reserved only when every limit admits too.
--
-- KEYS: one hash per subject (fields t0 t1 r0 r1 d u0 u1), then the money
--       charge's budgets and account.
-- ARGV: cost_requests, cost_tokens, drained_until_us, subject count, then
--       per subject rpm, tpm, rpd, tpd (-1 where the subject has no such
--       limit), then optionally a money charge (see money_args).
--       Until drained_until_us (Redis time), a subject Redis has no state
--       for starts with empty buckets instead of full ones: after Redis
--       lost its state, limits refill at their rate rather than open wide.
-- Reply, admitted: {1, now_us, <grant>[, <money left>]}
--        refused:  {0, now_us, subject, kind, why, wait_us, limit, used,
--                   requested, <standing>}
--        money:    {2, now_us, <money refusal>} (see money_check)
--   <grant> and <standing> are two readings (requests, tokens), each
--   {present, kind, subject, limit, remaining, reset_us}.
--   kind: 1 rpm, 2 tpm, 3 rpd, 4 tpd; why: 0 wait, 1 daily cap, 2 never fits.

local MINUTE = 60000000
local DAY = 86400000000
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local today = math.floor(now / DAY)
local until_midnight = (today + 1) * DAY - now
local cost = { tonumber(ARGV[1]), tonumber(ARGV[2]) }
local drained = now < tonumber(ARGV[3])
local subjects = tonumber(ARGV[4])
local money = nil
if #ARGV > 4 + subjects * 4 then money = money_args(subjects + 1, 5 + subjects * 4) end
local money_left_after = nil
if money then
  local refusal, left = money_check(money)
  if refusal then
    table.insert(refusal, 1, now)
    table.insert(refusal, 1, 2)
    return refusal
  end
  money_left_after = left
end

local function interval(amount)
  if amount <= 0 then return math.huge end
  return math.max(1, math.ceil(MINUTE / amount))
end

-- The bucket's tat for a limit of `amount`: what is outstanding stays the
-- same number of units when the amount was edited. A subject without state
-- in a drained period starts empty.
local function tat_for(st, slot, amount)
  if st.empty and st.rate[slot] == 0 then return now + amount * interval(amount) end
  local tat, old = st.tat[slot], st.rate[slot]
  if old == 0 or old == amount or tat <= now then return tat end
  local units = math.ceil((tat - now) / interval(old))
  return now + units * interval(amount)
end

local function load(key)
  local v = redis.call('HMGET', key, 't0', 't1', 'r0', 'r1', 'd', 'u0', 'u1')
  local n = function(i) return tonumber(v[i]) or 0 end
  local empty = drained and not v[1] and not v[2] and not v[5]
  return { tat = { n(1), n(2) }, rate = { n(3), n(4) }, day = n(5), used = { n(6), n(7) },
           empty = empty }
end

local function copy(st)
  return { tat = { st.tat[1], st.tat[2] }, rate = { st.rate[1], st.rate[2] }, day = st.day,
           used = { st.used[1], st.used[2] }, empty = st.empty }
end

-- kind 1..4 -> slot (1 requests, 2 tokens) and whether it is daily
local SLOT = { 1, 2, 1, 2 }
local DAILY = { false, false, true, true }

-- Keeps the reading with the fewest units left (on a tie, the later reset).
local function note(best, r)
  if best[SLOT[r.kind]] == nil then
    best[SLOT[r.kind]] = r
    return
  end
  local c = best[SLOT[r.kind]]
  if r.remaining < c.remaining or (r.remaining == c.remaining and r.reset > c.reset) then
    best[SLOT[r.kind]] = r
  end
end

local function standing(i, kind, amount, st)
  local slot = SLOT[kind]
  if DAILY[kind] then
    local used = (st.day == today) and st.used[slot] or 0
    return { kind = kind, subject = i, limit = amount, remaining = math.max(0, amount - used),
             reset = until_midnight }
  end
  local iv = interval(amount)
  local tau = amount * iv
  local depth = math.max(0, tat_for(st, slot, amount) - now)
  return { kind = kind, subject = i, limit = amount,
           remaining = math.floor(math.max(0, tau - depth) / iv), reset = depth }
end

-- Charges one limit into `nx`; returns a reading, or nil plus why and wait.
local function charge(i, kind, amount, nx, c)
  local slot = SLOT[kind]
  if DAILY[kind] then
    if nx.day ~= today then
      nx.day = today
      nx.used = { 0, 0 }
    end
    local used = nx.used[slot]
    if c > amount then return nil, 2, 0 end
    if used + c > amount then return nil, 1, until_midnight end
    nx.used[slot] = used + c
    return { kind = kind, subject = i, limit = amount, remaining = amount - used - c,
             reset = until_midnight }
  end
  if c > amount then return nil, 2, 0 end
  local iv = interval(amount)
  local tau = amount * iv
  local tat = tat_for(nx, slot, amount)
  local new = math.max(tat, now) + c * iv
  local depth = new - now
  if depth > tau then return nil, 0, depth - tau end
  nx.tat[slot] = new
  nx.rate[slot] = amount
  return { kind = kind, subject = i, limit = amount, remaining = math.floor((tau - depth) / iv),
           reset = depth }
end

local function severity(why, wait)
  if why == 2 then return 2, math.huge end
  return why, wait
end

local states, nexts, limits = {}, {}, {}
local grant = {}
local refusal = nil
for i = 1, subjects do
  local st = load(KEYS[i])
  states[i] = st
  local nx = copy(st)
  nexts[i] = nx
  limits[i] = {}
  for kind = 1, 4 do
    local amount = tonumber(ARGV[4 + (i - 1) * 4 + kind])
    if amount >= 0 then
      limits[i][kind] = amount
      local c = cost[SLOT[kind]]
      local r, why, wait = charge(i - 1, kind, amount, nx, c)
      if r then
        note(grant, r)
      else
        local before = standing(i - 1, kind, amount, st)
        local cand = { subject = i - 1, kind = kind, why = why, wait = wait, limit = amount,
                       used = amount - math.min(before.remaining, amount), requested = c }
        if refusal == nil then
          refusal = cand
        else
          local a1, a2 = severity(cand.why, cand.wait)
          local b1, b2 = severity(refusal.why, refusal.wait)
          if a1 > b1 or (a1 == b1 and a2 > b2) then refusal = cand end
        end
      end
    end
  end
end

local function reading(r)
  if r == nil then return { 0, 0, 0, 0, 0, 0 } end
  return { 1, r.kind, r.subject, r.limit, r.remaining, r.reset }
end

local function flat(out, ...)
  for _, part in ipairs({ ... }) do
    for _, v in ipairs(part) do out[#out + 1] = v end
  end
  return out
end

if refusal then
  -- A subject that started empty stays so: without this a refused request
  -- would leave no state and the next would find it empty again.
  for i = 1, subjects do
    if states[i].empty then
      for kind = 1, 2 do
        local amount = limits[i][kind]
        if amount then
          redis.call('HSET', KEYS[i], 't' .. (kind - 1), now + amount * interval(amount),
                     'r' .. (kind - 1), amount)
        end
      end
      redis.call('PEXPIRE', KEYS[i], 61000)
    end
  end
  local best = {}
  for i = 1, subjects do
    for kind = 1, 4 do
      if limits[i][kind] then note(best, standing(i - 1, kind, limits[i][kind], states[i])) end
    end
  end
  return flat({ 0, now, refusal.subject, refusal.kind, refusal.why, refusal.wait, refusal.limit,
                refusal.used, refusal.requested }, reading(best[1]), reading(best[2]))
end

for i = 1, subjects do
  local nx = nexts[i]
  redis.call('HSET', KEYS[i], 't0', nx.tat[1], 't1', nx.tat[2], 'r0', nx.rate[1], 'r1', nx.rate[2],
             'd', nx.day, 'u0', nx.used[1], 'u1', nx.used[2])
  -- Forgotten once forgetting changes nothing: both buckets full and the
  -- day's counters past.
  local keep = math.max(nx.tat[1] - now, nx.tat[2] - now, 0)
  if nx.day == today and (nx.used[1] > 0 or nx.used[2] > 0) then
    keep = math.max(keep, until_midnight)
  end
  redis.call('PEXPIRE', KEYS[i], math.floor(keep / 1000) + 1000)
end
if money then
  money_apply(money)
  return flat({ 1, now }, reading(grant[1]), reading(grant[2]), money_left(money_left_after))
end
return flat({ 1, now }, reading(grant[1]), reading(grant[2]))
