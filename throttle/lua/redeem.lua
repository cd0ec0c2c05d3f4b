-- A task comes back at the slot it booked: may it run now?
--
-- When the gate defers a task to a booked slot it leaves a ticket in Redis
-- ("<slot_us>:<booked_us>", Redis time), keyed by the task's id, in the
-- slot of its first bucket.  Only a ticket makes a slot: a message whose
-- throttle headers were copied into a retry, forged by a producer, or
-- delivered twice finds no ticket (each ticket is redeemed once) and books
-- like any new task.
--
-- KEYS[1]          the ticket
-- KEYS[2..n+1]     the buckets' pause markers (the end of the latest pause, Redis us)
-- KEYS[n+2..2n+1]  the buckets' reset markers (when the bucket was last reset, Redis us)
-- ARGV[1]          grace_us: how late the task may still start at its slot
-- ARGV[2]          spin_us: a slot this close counts as come (the caller sleeps the rest)
-- ARGV[3]          the latest pause end of buckets in other cluster slots (0: none)
-- ARGV[4]          the latest reset of buckets in other cluster slots (0: none)
--
-- Returns {verdict, wait_us, now_us}; wait_us = slot - now (negative: late)
--   0 none     no ticket: book again
--   1 go       the slot has come (within grace): run; the ticket is used up
--   2 early    the slot is further than spin_us: wait again; the ticket stays
--   3 late     more than grace_us late: book again (the slot is forfeit)
--   4 paused   a pause that began after the booking ends after the slot: book again
--   5 reset    the bucket was reset after the booking: book again
-- Every verdict but "early" deletes the ticket.

local NONE, GO, EARLY, LATE, PAUSED, RESET = 0, 1, 2, 3, 4, 5

local time = redis.call('TIME')
local now = time[1] * 1000000 + time[2]

local raw = redis.call('GET', KEYS[1])
local slot, booked
if raw then
  slot, booked = string.match(raw, '^(%d+):(%d+)$')
end
if not slot then
  if raw then
    redis.call('DEL', KEYS[1])
  end
  return {NONE, 0, now}
end
slot, booked = tonumber(slot), tonumber(booked)

local n = (#KEYS - 1) / 2
local paused_until = tonumber(ARGV[3])
local reset_at = tonumber(ARGV[4])
for i = 1, n do
  local p = tonumber(redis.call('GET', KEYS[1 + i]) or '0') or 0
  local r = tonumber(redis.call('GET', KEYS[1 + n + i]) or '0') or 0
  if p > paused_until then
    paused_until = p
  end
  if r > reset_at then
    reset_at = r
  end
end

local wait = slot - now
local verdict
if reset_at >= booked then
  verdict = RESET
elseif paused_until > slot then
  verdict = PAUSED
elseif wait > tonumber(ARGV[2]) then
  return {EARLY, wait, now}
elseif -wait > tonumber(ARGV[1]) then
  verdict = LATE
else
  verdict = GO
end
redis.call('DEL', KEYS[1])
return {verdict, wait, now}
