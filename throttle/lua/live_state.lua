-- The live limits in one round trip: the Redis clock and the four hashes
-- that say what an operator changed (see throttle/live.py).
--
-- KEYS[1]   <prefix>:~{live}:overrides   limit -> JSON {"rate", "burst", "mode"}
-- KEYS[2]   <prefix>:~{live}:versions    limit -> how many times it changed
-- KEYS[3]   <prefix>:~{live}:paused      limit -> end of the pause, Redis time in us
-- KEYS[4]   <prefix>:~{live}:pending     limit -> JSON {"at", "version", "override"}: what
--                                         stays in force until a change takes effect
-- ARGV      none
--
-- Returns {{seconds, microseconds}, overrides, versions, paused, pending}
--   the TIME reply, then each hash as HGETALL gives it (field, value, ...)
--
-- All four keys share the {live} hash tag: on Redis Cluster the script runs
-- on their node, and its TIME is that node's clock.

return {
  redis.call('TIME'),
  redis.call('HGETALL', KEYS[1]),
  redis.call('HGETALL', KEYS[2]),
  redis.call('HGETALL', KEYS[3]),
  redis.call('HGETALL', KEYS[4]),
}
