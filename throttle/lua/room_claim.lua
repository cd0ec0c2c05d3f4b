-- Claim the entries of one waiting room that are due, for one releaser (see throttle/room.py).
--
-- KEYS[1]   <prefix>:~room:{<room>}     zset  entry -> release time, Redis us
-- KEYS[2]   <prefix>:~room:{<room>}:m   hash  entry -> the parked message
-- KEYS[3]   <prefix>:~room:{<room>}:c   zset  entry -> when this claim expires, Redis us
-- KEYS[4]   <prefix>:~room:{<room>}:p   hash  the room's plan (deleted with the room's last entry)
-- KEYS[5]   <prefix>:~room:{<room>}:s   zset  entry -> when it was parked
-- ARGV[1]   release what is due up to this far ahead, us
-- ARGV[2]   how long a claim lasts, us (a releaser killed before it acknowledged gives its entries back then)
-- ARGV[3]   at most this many entries
--
-- Returns {now_us, next_us, entry, release_us, message, entry, release_us, message, ...}
--   next_us: the room's earliest release or claim expiry after this ("" when empty)
--
-- Claimed entries leave the room for the claims set: a second releaser
-- cannot take them; the claimer publishes them, then acknowledges
-- (room_ack.lua).  Claims that expired unacknowledged come back as due now
-- (at least once: the Celery gate drops the second copy of a message).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[3], id)
  if redis.call('HEXISTS', KEYS[2], id) == 1 then
    redis.call('ZADD', KEYS[1], 'NX', now, id)  -- NX: parked again meanwhile keeps its new time
  end
end

local out = {string.format('%d', now), ''}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now + tonumber(ARGV[1]), 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
local claim_until = now + tonumber(ARGV[2])
for i = 1, #due, 2 do
  local id = due[i]
  redis.call('ZREM', KEYS[1], id)
  local message = redis.call('HGET', KEYS[2], id)
  if message then
    redis.call('ZADD', KEYS[3], claim_until, id)
    out[#out + 1] = id
    out[#out + 1] = due[i + 1]
    out[#out + 1] = message
  else
    redis.call('ZREM', KEYS[5], id)  -- an entry without its message cannot be released: forget it whole
  end
end

local e = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
local c = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2]
if e and c then
  out[2] = (tonumber(c) < tonumber(e)) and c or e
else
  out[2] = e or c or ''
end
if out[2] == '' then
  redis.call('DEL', KEYS[4])  -- an empty room leaves no key behind
end
return out
