-- A fleet-wide semaphore: at most `capacity` leases held at once, each with an
-- expiry on the Redis server's clock, so a holder that dies (SIGKILL, a frozen
-- host, a lost network) frees its lease when the expiry passes, never later.
--
-- KEYS[1]   holders: zset lease id -> expiry, Redis time in integer us
-- KEYS[2]   holders' descriptions: hash lease id -> "<acquired at, Redis us> <description>"
-- ARGV[1]   mode: 0 status, 1 acquire, 2 renew, 3 release
-- ARGV[2]   lease id (acquire, renew, release)
-- ARGV[3]   capacity: how many leases may be held at once (acquire)
-- ARGV[4]   expiry in us from now (acquire, renew)
-- ARGV[5]   description of the holder (acquire)
--
-- Returns {granted, held, wait_us, now_us, reclaimed}
--   granted    acquire: 1 if the lease is now held (a lease id already held
--              is renewed, not counted twice); renew: 1 if it was still held
--              (0: it expired and may be someone else's now); release: 1 if it
--              was held; status: 1
--   held       leases held after the call
--   wait_us    acquire refused: time until the earliest lease expires unless
--              renewed (a bound for pollers; a release comes sooner); else 0
--   now_us     the Redis time of the call
--   reclaimed  expired leases removed by this call (their holders died or
--              froze past their expiry)
--
-- Every call first removes expired leases: no sweeper process is needed, and
-- a lease is free within its expiry of its holder's death.  The keys expire
-- with their last lease: an idle semaphore costs nothing.

local STATUS, ACQUIRE, RENEW, RELEASE = 0, 1, 2, 3

local time = redis.call('TIME')
local now = time[1] * 1000000 + time[2]
local holders, about = KEYS[1], KEYS[2]
local mode = tonumber(ARGV[1])
local lease = ARGV[2]

-- A key of another type (written by someone else) is not ours: start afresh
-- rather than fail every call (the bound errs on the safe side: leases held
-- in a corrupted key are lost, and the holders' renewals tell them so).
local kind = redis.call('TYPE', holders).ok
if kind ~= 'zset' and kind ~= 'none' then
  redis.call('DEL', holders)
end
kind = redis.call('TYPE', about).ok
if kind ~= 'hash' and kind ~= 'none' then
  redis.call('DEL', about)
end

local expired = redis.call('ZRANGEBYSCORE', holders, '-inf', now)
local reclaimed = #expired
if reclaimed > 0 then
  redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
  for i = 1, reclaimed, 1000 do
    redis.call('HDEL', about, unpack(expired, i, math.min(i + 999, reclaimed)))
  end
end

local granted = 1
local wait = 0
if mode == ACQUIRE or mode == RENEW then
  local expiry = now + tonumber(ARGV[4])
  local held = redis.call('ZSCORE', holders, lease)
  if held then
    redis.call('ZADD', holders, 'XX', string.format('%.0f', expiry), lease)
  elseif mode == RENEW then
    granted = 0
  elseif redis.call('ZCARD', holders) < tonumber(ARGV[3]) then
    redis.call('ZADD', holders, string.format('%.0f', expiry), lease)
    redis.call('HSET', about, lease, string.format('%.0f', now) .. ' ' .. ARGV[5])
  else
    granted = 0
    local first = redis.call('ZRANGE', holders, 0, 0, 'WITHSCORES')
    wait = tonumber(first[2]) - now
  end
elseif mode == RELEASE then
  granted = redis.call('ZREM', holders, lease)
  redis.call('HDEL', about, lease)
end

local count = redis.call('ZCARD', holders)
if count == 0 then
  redis.call('DEL', holders, about)
elseif mode ~= STATUS or reclaimed > 0 then
  -- Live as long as the latest expiry: keys of dead holders never stay.
  local last = redis.call('ZRANGE', holders, -1, -1, 'WITHSCORES')
  local ttl_ms = math.ceil((tonumber(last[2]) - now) / 1000) + 1
  redis.call('PEXPIRE', holders, ttl_ms)
  redis.call('PEXPIRE', about, ttl_ms)
end

return {granted, count, wait, now, reclaimed}
