-- A fleet-wide semaphore: at most `capacity` leases held at once, each with an
-- expiry on the Redis server's clock, so a holder that dies (SIGKILL, a frozen
-- host, a lost network) frees its lease when the expiry passes, never later;
-- and a queue of waiters, to whom a freed lease is handed over in order.
--
-- KEYS[1]   holders: zset lease id -> expiry, Redis time in integer us
-- KEYS[2]   holders' descriptions: hash lease id -> "<acquired at, Redis us> <description>"
-- KEYS[3]   queue: zset waiter (its lease id) -> when it joined, Redis us (first come, first served)
-- KEYS[4]   waiters: zset waiter -> when it stops waiting unless it says so again, Redis us
-- KEYS[5]   waiters' payloads: hash waiter -> payload, handed back with the lease
-- ARGV[1]   mode: 0 status, 1 acquire, 2 renew, 3 release, 4 wait, 5 leave,
--           6 take up, 7 release every lease whose id starts with ARGV[2]
-- ARGV[2]   lease id (all but status; a prefix for mode 7)
-- ARGV[3]   capacity: how many leases may be held at once
-- ARGV[4]   expiry in us from now (acquire, renew, wait)
-- ARGV[5]   description of the holder (acquire, wait)
-- ARGV[6]   wait: how long the waiter stays queued unless it waits again, us
-- ARGV[7]   wait: its payload; handed back to whoever hands it the lease
-- ARGV[8]   how long a handed-over lease is kept for its waiter to take up, us
--
-- Modes:
--   status   how many are held and queued; with ARGV[8] = 0 (an operator's
--            look) read only: it reclaims nothing and hands nothing over
--   acquire  a lease now if fewer than capacity are held (an id already held
--            is renewed, not counted twice)
--   wait     acquire, or join the queue (keeping an earlier place) and stay
--            in it for ARGV[6] us unless called again
--   renew    push a held lease's expiry out; a lease handed over to a waiter
--            is taken up by renewing it
--   release  give a lease back
--   leave    stop waiting; granted if the lease was handed over meanwhile
--   take     a waiter with a payload (a parked Celery task whose message was
--            published when its lease was handed over) takes its lease up:
--            granted if it was handed over and not taken yet, or if it is
--            first in the queue and a lease is free; else wait_us is -1 when
--            the waiter is unknown (taken up by another copy of the message,
--            or never parked), -2 when it is overdue (its stay ended: the
--            entry is removed now, the copy is to fail) and 0 when it still
--            waits in the queue
--   release-prefix  release every lease whose id starts with ARGV[2] (the
--            leases of one Celery task, released by the worker that saw its
--            process die); granted is how many
--
-- A waiter with a payload is not a process that waits: its payload (a task
-- message) is all there is of it.  So the payload stays in Redis until the
-- lease handed over to it is taken up; a handed-over lease that expires
-- untaken (the message was lost, or is late) goes back to the head of the
-- queue and is handed over again, with its payload, to be published again.
--
-- Every call first removes expired leases and waiters that stopped waiting,
-- then hands free leases to the queue's first waiters (their lease is kept
-- for them ARGV[8] us, until they take it up by renewing it).  So no sweeper
-- runs anywhere, and a lease is free within its expiry of its holder's death.
--
-- Returns {granted, held, wait_us, now_us, reclaimed, queued, w1, p1, w2, p2, ...}
--   granted    1 if the call did what it asked (acquire/wait: the lease is
--              held; renew/release: it was held; leave: it was handed over)
--   held       leases held after the call (handed-over ones included)
--   wait_us    acquire/wait refused: time until the earliest lease expires
--              unless renewed (a bound; a release comes sooner); else 0
--   now_us     the Redis time of the call
--   reclaimed  expired leases this call removed
--   queued     waiters queued after the call
--   w_i, p_i   waiters this call handed a lease to, with their payloads: the
--              caller tells them (wakes them, or publishes their message);
--              overdue parked tasks come first, with no lease
--
-- The keys expire with their last lease or waiter: an idle semaphore costs
-- nothing.

local STATUS, ACQUIRE, RENEW, RELEASE, WAIT, LEAVE, TAKE, RELEASE_PREFIX = 0, 1, 2, 3, 4, 5, 6, 7
local GONE_PER_CALL, OVERDUE_PER_CALL = 1000, 100
local OVERDUE_KEEP_MS = 3600000

local time = redis.call('TIME')
local now = time[1] * 1000000 + time[2]
local holders, about, queue, waiters, payloads = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local mode = tonumber(ARGV[1])
local lease = ARGV[2]
local capacity = tonumber(ARGV[3])

local function decide()
  -- An operator's look (status, handing nothing over) changes nothing:
  -- expired leases are reclaimed, and counted, by the workers' own calls.
  if mode == STATUS and (tonumber(ARGV[8]) or 0) <= 0 then
    return {1, redis.call('ZCOUNT', holders, '(' .. string.format('%.0f', now), '+inf'), 0, now, 0,
            redis.call('ZCARD', queue)}
  end

  local function remove_all(key, members, command)
    for i = 1, #members, 1000 do
      redis.call(command, key, unpack(members, i, math.min(i + 999, #members)))
    end
  end

  -- Expired leases out.
  local expired = redis.call('ZRANGEBYSCORE', holders, '-inf', now)
  local reclaimed = #expired
  if reclaimed > 0 then
    redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
    remove_all(about, expired, 'HDEL')
    -- A lease handed over to a parked task and never taken up: its payload is
    -- still here, so the task goes back to the head of the queue.
    for _, id in ipairs(expired) do
      if redis.call('HEXISTS', payloads, id) == 1 and redis.call('ZSCORE', waiters, id) then
        redis.call('ZADD', queue, 1, id)
      end
    end
  end

  -- Waiters that stopped waiting (gave up, or died) out of the queue.  A
  -- parked task (a waiter with a payload) whose stay ended -- its
  -- throttle_max_defer is spent -- is not dropped: it leaves the queue and is
  -- handed back without a lease ("overdue"), for its message to be published
  -- and fail where the task's errors are seen.  Its payload stays until that
  -- copy arrives (take); it is handed back again every ARGV[8] us until one
  -- does.  A call looks at GONE_PER_CALL of them and hands back at most
  -- OVERDUE_PER_CALL (a bounded call; the rest wait for the next ones).
  local hold_for = tonumber(ARGV[8]) or 0
  local gone = redis.call('ZRANGEBYSCORE', waiters, '-inf', now, 'LIMIT', 0, GONE_PER_CALL)
  local overdue = {}
  if #gone > 0 then
    local dropped = {}
    for _, id in ipairs(gone) do
      if redis.call('HEXISTS', payloads, id) == 1 then
        -- Kept.  (A call that hands nothing over, an operator's look, leaves
        -- it as it is for the next call that does.)
        if hold_for > 0 then
          if redis.call('ZSCORE', holders, id) then
            -- Handed a lease before its stay ended: kept until it takes it up.
            redis.call('ZADD', waiters, string.format('%.0f', now + hold_for), id)
          elseif #overdue < OVERDUE_PER_CALL * 2 then
            redis.call('ZADD', waiters, string.format('%.0f', now + hold_for), id)
            overdue[#overdue + 1] = id
            overdue[#overdue + 1] = redis.call('HGET', payloads, id)
          end
        end
      else
        dropped[#dropped + 1] = id
      end
    end
    remove_all(waiters, dropped, 'ZREM')
    remove_all(payloads, dropped, 'HDEL')
    remove_all(queue, gone, 'ZREM')
  end

  local granted = 1
  local wait = 0
  local expiry = now + (tonumber(ARGV[4]) or 0)

  local function leave_queue(id)
    redis.call('ZREM', queue, id)
    redis.call('ZREM', waiters, id)
    redis.call('HDEL', payloads, id)
  end

  if mode == ACQUIRE or mode == WAIT or mode == RENEW then
    if redis.call('ZSCORE', holders, lease) then
      redis.call('ZADD', holders, 'XX', string.format('%.0f', expiry), lease)
      -- A lease handed over to this waiter, taken up now: say who holds it.
      if mode == WAIT and string.find(redis.call('HGET', about, lease) or '', ' handed over$') then
        redis.call('HSET', about, lease, string.format('%.0f', now) .. ' ' .. ARGV[5])
      end
      leave_queue(lease)
    elseif mode == RENEW then
      granted = 0
    elseif redis.call('ZCARD', holders) < capacity and (redis.call('ZCARD', queue) == 0 or redis.call('ZRANK', queue, lease) == 0) then
      -- Free, and no one waits before this caller (a lease freed by expiry
      -- and not yet handed over goes to the queue's first).
      redis.call('ZADD', holders, string.format('%.0f', expiry), lease)
      redis.call('HSET', about, lease, string.format('%.0f', now) .. ' ' .. ARGV[5])
      leave_queue(lease)
    else
      granted = 0
      local first = redis.call('ZRANGE', holders, 0, 0, 'WITHSCORES')
      if first[2] then
        wait = tonumber(first[2]) - now
      end
      if mode == WAIT then
        redis.call('ZADD', queue, 'NX', string.format('%.0f', now), lease)
        redis.call('ZADD', waiters, string.format('%.0f', now + tonumber(ARGV[6])), lease)
        if ARGV[7] ~= '' then
          redis.call('HSET', payloads, lease, ARGV[7])
        end
      end
    end
  elseif mode == TAKE then
    if redis.call('HEXISTS', payloads, lease) == 0 then
      granted = 0
      wait = -1
    elseif redis.call('ZSCORE', holders, lease) then
      redis.call('ZADD', holders, 'XX', string.format('%.0f', expiry), lease)
      redis.call('HSET', about, lease, string.format('%.0f', now) .. ' ' .. ARGV[5])
      leave_queue(lease)
    elseif not redis.call('ZRANK', queue, lease) then
      -- Neither holding nor queued, its payload kept: overdue (its stay
      -- ended); this copy takes its entry away and fails.
      leave_queue(lease)
      granted = 0
      wait = -2
    elseif redis.call('ZCARD', holders) < capacity and redis.call('ZRANK', queue, lease) == 0 then
      redis.call('ZADD', holders, string.format('%.0f', expiry), lease)
      redis.call('HSET', about, lease, string.format('%.0f', now) .. ' ' .. ARGV[5])
      leave_queue(lease)
    else
      granted = 0
    end
  elseif mode == RELEASE_PREFIX then
    granted = 0
    local all = redis.call('ZRANGE', holders, 0, -1)
    for _, id in ipairs(all) do
      if string.sub(id, 1, #lease) == lease then
        redis.call('ZREM', holders, id)
        redis.call('HDEL', about, id)
        granted = granted + 1
      end
    end
  elseif mode == RELEASE then
    granted = redis.call('ZREM', holders, lease)
    redis.call('HDEL', about, lease)
  elseif mode == LEAVE then
    leave_queue(lease)
    granted = redis.call('ZSCORE', holders, lease) and 1 or 0
  end

  -- Free leases to the first waiters, kept for them until they take them up.
  local handed = overdue
  if hold_for > 0 then
    while redis.call('ZCARD', holders) < capacity do
      local next_one = redis.call('ZRANGE', queue, 0, 0)[1]
      if not next_one then
        break
      end
      local payload = redis.call('HGET', payloads, next_one) or ''
      if payload == '' then
        leave_queue(next_one)
      else
        -- Kept until taken up (see above); only its place in the queue goes.
        redis.call('ZREM', queue, next_one)
      end
      redis.call('ZADD', holders, string.format('%.0f', now + hold_for), next_one)
      redis.call('HSET', about, next_one, string.format('%.0f', now) .. ' handed over')
      handed[#handed + 1] = next_one
      handed[#handed + 1] = payload
    end
  end

  -- Keys live as long as their latest lease or waiter: nothing of a dead
  -- holder or waiter stays.
  local count = redis.call('ZCARD', holders)
  local queued = redis.call('ZCARD', queue)
  local last = 0
  if count > 0 then
    last = tonumber(redis.call('ZRANGE', holders, -1, -1, 'WITHSCORES')[2])
  end
  -- (Waiters, not the queue: a parked task handed a lease is out of the queue
  -- but its payload must outlive the hand-over.)
  if redis.call('ZCARD', waiters) > 0 then
    local last_waiter = tonumber(redis.call('ZRANGE', waiters, -1, -1, 'WITHSCORES')[2])
    if last_waiter > last then
      last = last_waiter
    end
  end
  if count == 0 and queued == 0 and redis.call('ZCARD', waiters) == 0 then
    redis.call('DEL', holders, about, queue, waiters, payloads)
  elseif mode ~= STATUS or reclaimed > 0 or #gone > 0 or #handed > 0 then
    local ttl_ms = math.ceil((last - now) / 1000) + 1
    if redis.call('EXISTS', payloads) == 1 then
      -- A parked task is kept past its stay, for a worker's call to hand it
      -- back overdue (the sweepers look each second).
      ttl_ms = ttl_ms + OVERDUE_KEEP_MS
    end
    for _, key in ipairs({holders, about, queue, waiters, payloads}) do
      if redis.call('EXISTS', key) == 1 then
        redis.call('PEXPIRE', key, ttl_ms)
      end
    end
  end

  local reply = {granted, count, wait, now, reclaimed, queued}
  for _, value in ipairs(handed) do
    reply[#reply + 1] = value
  end
  return reply
end

-- A key of another type (written by someone else) is not ours: start afresh
-- rather than fail every call.  Leases held in it are lost to the count
-- (their holders' renewals tell them so).  Found by the error it causes,
-- not by checking each key's TYPE on every call.
local ok, result = pcall(decide)
if ok then
  return result
end
local message = type(result) == 'table' and result.err or tostring(result)
if not string.find(message, 'WRONGTYPE', 1, true) then
  error(result)
end
redis.call('DEL', holders, about, queue, waiters, payloads)
return decide()
