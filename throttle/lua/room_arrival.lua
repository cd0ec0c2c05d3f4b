-- A released message arrives: is it the copy that was released, or a second one? (see throttle/room.py)
--
-- KEYS[1]   <prefix>:~room:{<room>}:r:<entry>   the copy that arrived first
-- ARGV[1]   this copy's id (each publish of an entry has its own)
-- ARGV[2]   how long to remember it, ms
--
-- Returns 1 for the first copy to arrive, and for that same copy delivered
-- again (a broker redelivery after a worker died must still run); 0 for any
-- other copy: a releaser died after publishing and before acknowledging, and
-- the entry was published twice.

local first = redis.call('GET', KEYS[1])
if not first then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
if first == ARGV[1] then return 1 end
return 0
