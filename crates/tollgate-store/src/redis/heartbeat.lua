-- A replica announces itself and learns how many are alive, and whether
-- Redis still holds the state it held (its epoch: a random token set once;
-- a Redis that restarted empty, or was flushed, has none or another).
--
-- KEYS: the replicas' sorted set, the epoch. ARGV: replica id, a new epoch
-- to set if there is none, how long a silent replica counts as alive (ms).
-- Reply: {live replicas, Redis time in µs, epoch, 1 if this call set it}.

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local alive_ms = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - alive_ms)
redis.call('PEXPIRE', KEYS[1], alive_ms * 2)
local live = redis.call('ZCARD', KEYS[1])
local epoch = redis.call('GET', KEYS[2])
local set = 0
if not epoch then
  redis.call('SET', KEYS[2], ARGV[2])
  epoch = ARGV[2]
  set = 1
end
return {live, now_us, epoch, set}
