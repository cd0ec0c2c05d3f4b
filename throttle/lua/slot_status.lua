-- The Redis clock and some markers, in one round trip on the node that holds
-- them.  Used for the buckets of a multi-limit that live in other Redis
-- Cluster slots than its ticket (lua/redeem.lua reads the rest itself), and
-- by anyone who wants the markers on the server's own clock: on Redis
-- Cluster a keyless TIME would go to any node.
--
-- KEYS[i]   a marker (pause end or reset time, Redis us; may be absent)
-- ARGV      none
--
-- Returns {{seconds, microseconds}, {marker_1, ..., marker_n}}
--   the TIME reply, then each marker's value or false where there is none

return {redis.call('TIME'), redis.call('MGET', unpack(KEYS))}
