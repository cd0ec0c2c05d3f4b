-- Token bucket as GCRA (generic cell rate algorithm), decided for one or more
-- buckets at once, all-or-nothing, on the Redis server's clock.
--
-- Each bucket is one string key holding its TAT ("theoretical arrival time"):
-- the Redis time, in integer microseconds, at which the bucket will be full
-- again.  A bucket with TAT <= now is full; one with TAT = now + tau is empty.
-- Admitting `cost` tokens moves TAT forward by cost * interval.
--
-- KEYS[i]          bucket i, i = 1..n (all keys share a hash tag on Redis Cluster)
-- KEYS[n+i]        pause mode: bucket i's pause marker (optional);
--                  reset mode: bucket i's reset marker
-- ARGV[1]          mode: 0 peek, 1 consume, 2 reserve, 3 pause, 4 refund,
--                  5 batch (several independent decisions; see the end),
--                  6 reset (forget the buckets; see the end)
-- ARGV[2]          cost in tokens (the same for every bucket)
-- ARGV[3]          reserve: max_wait in us; pause: pause length in us;
--                  reset: how long the reset markers must live, in us
-- ARGV[2+2i]       interval_us of bucket i (1e6 / rate, rounded up)
-- ARGV[3+2i]       tau_us of bucket i (burst * interval_us)
--
-- Returns {allowed, refused_index, wait_us, remaining, reset_us, now_us, recovered}
--   allowed        1 if the decision was granted (and written), else 0
--   refused_index  1-based index of the bucket with the longest wait when
--                  refused, else 0
--   wait_us        consume/peek: time until the call could be granted;
--                  reserve: time until the booked slot (longest of all buckets)
--   remaining      whole tokens left in the emptiest bucket after the decision
--   reset_us       time until every bucket is full again
--   now_us         the Redis time the decision was made at
--   recovered      1 if a bucket held a value this script did not write
--                  (corrupted or of another type); it was treated as empty
--
-- Pause also sets each bucket's marker to the pause's end (Redis us): a task
-- that booked a slot before the pause finds it there and books again, rather
-- than running inside the pause (lua/redeem.lua).  Reset deletes the buckets
-- and sets their reset markers to now: every slot booked before is void.

-- Needs Redis >= 5: scripts are replicated by their effects, so reading
-- TIME before writing is allowed (and replicas get plain SETs).

-- The modes (ARGV[1]); throttle.gcra.Mode holds the same numbers.
local PEEK, CONSUME, RESERVE, PAUSE, REFUND, BATCH, RESET = 0, 1, 2, 3, 4, 5, 6

local time = redis.call('TIME')
local now = time[1] * 1000000 + time[2]

-- Any legitimate TAT lies within tau plus 30 days (the longest reservation or
-- pause the client accepts: throttle.limit.MAX_WAIT_SECONDS) of now.  Beyond
-- that the value is corrupted.
local SANE_DEBT_US = 2592000000000

-- One all-or-nothing decision over n buckets: KEYS[k0 + i] with
-- (interval, tau) at ARGV[a0 + 2i - 1], ARGV[a0 + 2i]; pause markers (pause
-- mode only) at KEYS[k0 + n + i] when with_markers.
local function decide(mode, cost, limit_us, n, k0, a0, with_markers)
  local intervals, taus, tats, new_tats, corrupt = {}, {}, {}, {}, {}
  local recovered = 0
  local granted = 1
  local refused = 0
  local wait = 0
  local longest_refusal = -1

  for i = 1, n do
    local interval = tonumber(ARGV[a0 + 2 * i - 1])
    local tau = tonumber(ARGV[a0 + 2 * i])
    intervals[i], taus[i] = interval, tau
    local raw = redis.pcall('GET', KEYS[k0 + i])
    local tat = now
    if raw then
      -- Whole decimal microseconds within reach are ours (string.format
      -- '%.0f' writes them); anything else (garbage, "0x10", "1e9", "1_000",
      -- absurdly far, or an error reply for a key of another type) is not,
      -- and is treated as an empty bucket: the limit errs on the safe side.
      -- throttle/gcra.py reads values by the same rule.
      local value = type(raw) == 'string' and string.match(raw, '^%d+$') and tonumber(raw)
      if not value or value > now + tau + SANE_DEBT_US then
        tat = now + tau
        corrupt[i] = true
        recovered = 1
      elseif value > now then
        tat = value
      end
    end
    tats[i] = tat

    local new_tat, bucket_wait, ok
    if mode == PAUSE then
      -- Pause: nothing is admitted before now + limit_us; then the bucket is
      -- empty and refills at its rate, so the fleet restarts gently.
      new_tat = now + limit_us + tau - interval
      if tat > new_tat then
        new_tat = tat
      end
      bucket_wait = new_tat - tau + interval - now
      ok = true
    elseif mode == REFUND then
      -- Refund: give back `cost` tokens this caller took a moment ago, when a
      -- decision spanning several Redis Cluster slots was refused in a later
      -- slot.  Never more than a full bucket.
      new_tat = tat - cost * interval
      if new_tat < now then
        new_tat = now
      end
      bucket_wait = 0
      ok = true
    else
      new_tat = tat + cost * interval
      bucket_wait = new_tat - tau - now
      if bucket_wait < 0 then
        bucket_wait = 0
      end
      if mode == RESERVE then
        ok = bucket_wait <= limit_us
      else
        ok = bucket_wait == 0
      end
    end
    new_tats[i] = new_tat

    if not ok then
      granted = 0
      if bucket_wait > longest_refusal then
        longest_refusal = bucket_wait
        refused = i
      end
    end
    if bucket_wait > wait then
      wait = bucket_wait
    end
  end

  local write = granted == 1 and mode ~= PEEK
  local remaining = -1
  local reset = 0
  for i = 1, n do
    local interval, tau, tat = intervals[i], taus[i], tats[i]
    if write then
      tat = new_tats[i]
    end
    if write or (corrupt[i] and mode ~= PEEK) then
      -- Expire when the bucket is full again: an idle bucket costs nothing.
      -- string.format keeps all digits; tostring() would print 1.7e+15.
      local ttl_ms = math.ceil((tat - now) / 1000)
      if ttl_ms < 1 then
        ttl_ms = 1
      end
      redis.call('SET', KEYS[k0 + i], string.format('%.0f', tat), 'PX', ttl_ms)
    end
    local tokens = math.floor((tau - (tat - now)) / interval)
    if tokens < 0 then
      tokens = 0
    end
    if remaining < 0 or tokens < remaining then
      remaining = tokens
    end
    if tat - now > reset then
      reset = tat - now
    end
  end

  if granted == 0 then
    wait = longest_refusal
  end

  if mode == PAUSE and with_markers then
    local marker_ms = math.ceil(limit_us / 1000)
    for i = 1, n do
      -- Outlive the pause by the time to refill, so late arrivals see it too.
      local ttl_ms = marker_ms + math.ceil(taus[i] / 1000)
      redis.call('SET', KEYS[k0 + n + i], string.format('%.0f', now + limit_us), 'PX', ttl_ms)
    end
  end

  return {granted, refused, wait, remaining, reset, now, recovered}
end

local mode = tonumber(ARGV[1])

if mode == BATCH then
  -- Batch: many independent decisions in one call, each all-or-nothing on
  -- its own buckets.  ARGV[2] inner mode (0 peek, 1 consume, 2 reserve),
  -- ARGV[3] limit_us, then per decision: cost, n, (interval, tau) * n; the
  -- decisions' keys follow each other in KEYS.  Replies are concatenated.
  local inner = tonumber(ARGV[2])
  local limit_us = tonumber(ARGV[3])
  local out = {}
  local a, k = 4, 0
  while a <= #ARGV do
    local cost, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    local reply = decide(inner, cost, limit_us, n, k, a + 1, false)
    for j = 1, 7 do
      out[#out + 1] = reply[j]
    end
    a = a + 2 + 2 * n
    k = k + n
  end
  return out
end

local n = (#ARGV - 3) / 2

if mode == RESET then
  -- The buckets are full again, and tasks holding slots booked in them
  -- before now must book again (their tickets are older than the marker).
  local ttl_ms = math.ceil(tonumber(ARGV[3]) / 1000)
  for i = 1, n do
    redis.call('DEL', KEYS[i])
    redis.call('SET', KEYS[n + i], string.format('%.0f', now), 'PX', ttl_ms)
  end
  return {1, 0, 0, 0, 0, now, 0}
end

return decide(mode, tonumber(ARGV[2]), tonumber(ARGV[3]), n, 0, 3, #KEYS == 2 * n)
