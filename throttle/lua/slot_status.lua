-- Where a task that booked a slot stands now: the Redis clock and the pause
-- markers of its buckets, in one round trip on the node that holds them.
--
-- A task that comes back at its booked slot runs if the slot has come (on
-- this clock, not its host's) and no pause began after the booking.  One
-- script instead of a TIME + MGET pipeline: on Redis Cluster a keyless TIME
-- would go to any node, and this reads both from the keys' own node.
--
-- KEYS[i]   the pause marker of bucket i (<bucket key>:paused; may be absent)
-- ARGV      none
--
-- Returns {{seconds, microseconds}, {marker_1, ..., marker_n}}
--   the TIME reply, then each marker's value (the pause's end in Redis
--   microseconds) or false where there is none

return {redis.call('TIME'), redis.call('MGET', unpack(KEYS))}
