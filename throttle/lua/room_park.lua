-- Park one entry in a waiting room (see throttle/room.py).
--
-- KEYS[1]   <prefix>:~room:{<room>}     zset  entry -> release time, Redis us
-- KEYS[2]   <prefix>:~room:{<room>}:m   hash  entry -> the parked message
-- KEYS[3]   <prefix>:~room:{<room>}:p   hash  "version" -> the limit version release times follow
-- KEYS[4]   <prefix>:~room:{<room>}:s   zset  entry -> when it was parked, Redis us
-- ARGV[1]   the entry (a task id: a task parks once, a second park replaces the first)
-- ARGV[2]   when to release it, Redis time in us
-- ARGV[3]   the message
-- ARGV[4]   the room's limit version now (an occupied room keeps its own: the releaser re-plans it)
--
-- Returns the room's earliest release time (us, as a string), for the index of rooms.

-- An empty room is planned under the version now; a room with entries keeps
-- its plan (the releaser re-plans it when the versions differ).
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[3], 'version', ARGV[4])
else
  redis.call('HSETNX', KEYS[3], 'version', ARGV[4])
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[4], 'NX', string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2])), ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
