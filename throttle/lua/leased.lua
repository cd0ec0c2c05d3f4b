-- A concurrency lease and a rate decision in one call (one round trip): the
-- gate's common case, a new task of a limit with both.  This file is the end
-- of a script that begins with lease.lua and gcra.lua, each wrapped as a
-- function of (KEYS, ARGV) (throttle.script.source("leased")).
--
-- KEYS[1..5]   lease.lua's keys (the concurrency limit's)
-- KEYS[6..]    gcra.lua's keys (the rate limits' buckets)
-- ARGV[1..8]   lease.lua's arguments (mode acquire)
-- ARGV[9..]    gcra.lua's arguments
--
-- The lease first: refused, the buckets are not touched (a task that gets no
-- lease takes no token).  Granted, the rate decides as it would alone; if it
-- defers the task, the caller gives the lease back.
--
-- Returns gcra.lua's reply (7 integers; all 0 when the lease was refused and
-- the rate was not asked), then lease.lua's reply.

local lease_keys, bucket_keys, lease_args, gcra_args = {}, {}, {}, {}
for i = 1, #KEYS do
  if i <= 5 then lease_keys[i] = KEYS[i] else bucket_keys[i - 5] = KEYS[i] end
end
for i = 1, #ARGV do
  if i <= 8 then lease_args[i] = ARGV[i] else gcra_args[i - 8] = ARGV[i] end
end

local lease = lease_call(lease_keys, lease_args)
local rate = {0, 0, 0, 0, 0, 0, 0}
if lease[1] == 1 then
  rate = gcra_call(bucket_keys, gcra_args)
end
for _, value in ipairs(lease) do
  rate[#rate + 1] = value
end
return rate
