-- Re-plan one waiting room after its limit changed (see throttle/room.py).
--
-- KEYS[1]   <prefix>:~room:{<room>}     zset  entry -> release time, Redis us
-- KEYS[2]   <prefix>:~room:{<room>}:p   hash  "version" -> the version release times follow
-- ARGV[1]   the limit's version now
-- ARGV[2]   the limit's emission interval now, us
-- ARGV[3]   its burst
--
-- The entries keep their order and are spread from now at the new rate (the
-- first burst at once): raising a limit drains the room faster at once,
-- lowering it slows the releases down.  Released tasks book again in the
-- new bucket at the gate, which is what enforces the limit.
-- Returns how many entries were re-planned.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst = tonumber(ARGV[2]), tonumber(ARGV[3])
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local batch = {}
for k, id in ipairs(ids) do
  local ahead = k - burst
  if ahead < 0 then ahead = 0 end
  batch[#batch + 1] = string.format('%d', now + ahead * interval)
  batch[#batch + 1] = id
  if #batch >= 2000 then
    redis.call('ZADD', KEYS[1], unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('ZADD', KEYS[1], unpack(batch)) end
redis.call('HSET', KEYS[2], 'version', ARGV[1])
return #ids
